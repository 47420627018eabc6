"""After training: merge the adapter (`merge`), try the model (`inference`), measure it
on the eval set (`evaluate`), quantize it (`quantize`). Each works on a `Target`
(`target`): a trained run or a config, resolved to its config and its model folder.

The `launch merge-lora|inference|evaluate|quantize` commands import these inside the
command, so `launch --help` never loads torch.
"""
