"""Every way a backend starts the payload:

    python -m payload train CFG                 the training run itself (one rank)
    python -m payload.entry.torchrun ...        torchrun, tidied, around it
    python -m payload.entry run JOB.json        a RemoteJob on this node (SkyPilot's run
                                                script, Ray's driver)
    payload.entry.modal.ferry_train(job_json)   the function Modal serializes and runs

These live in the payload, not in the launcher, so that what a platform ships resolves
in the image, where only `payload/` exists.
"""
