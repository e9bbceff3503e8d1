"""`python -m edgeseg` is the same as the `edgeseg` console script.

It is also the entry point for data-parallel training: `torchrun --nproc-per-node N -m edgeseg train ...`
starts N copies; each first quiets its stdout unless it is rank 0 and pins its GPU (`prepare_process`).
"""

import os

if __name__ == "__main__":
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun; torch is only imported then
        from edgeseg.train.distributed import prepare_process

        prepare_process()
    from edgeseg.cli.app import main

    main()
