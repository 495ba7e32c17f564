"""Scale-out on torch.distributed, applied to a plain model from outside: device mesh, data and
expert parallelism (`parallelize`), pipeline schedules with their simulator and executor."""
