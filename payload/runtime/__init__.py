"""What a job is and where it runs, without torch: the job contract every remote backend
sends (`job`), "who am I in this job" on each kind of cluster and the one function that
turns it into torchrun's arguments (`cluster`), and process handling (`procs`).
Standard library only: this is imported in a fresh container before anything else."""
