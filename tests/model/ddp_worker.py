"""A torchrun worker for tests/model/test_distributed.py: `mtl train` as one rank (the way
infra/k8s/train/train-multinode.yaml starts it), with every checkpoint save and log append recorded by rank
in $MTL_TEST_WRITES (JSON lines), so the test can tell which ranks wrote. With $MTL_TEST_KILL_AFTER_SAVES=n,
rank 0 kills itself (SIGKILL, no clean-up) right after its n-th checkpoint save: a crash mid-stage."""

import json
import os
import signal
import sys
from pathlib import Path

import tasks_mtl.train as train

RECORD = Path(os.environ["MTL_TEST_WRITES"])
RANK = int(os.environ["RANK"])
KILL_AFTER = int(os.environ.get("MTL_TEST_KILL_AFTER_SAVES", "0"))
saves = 0


def recorded(name, real, path_arg):
    def wrapped(*args, **kwargs):
        global saves
        with RECORD.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"rank": RANK, "call": name, "path": str(args[path_arg])}) + "\n")
        result = real(*args, **kwargs)
        saves += name == "save_checkpoint"
        if RANK == 0 and name == "save_checkpoint" and saves == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    return wrapped


train.save_checkpoint = recorded("save_checkpoint", train.save_checkpoint, 2)
train.append_log = recorded("append_log", train.append_log, 0)

if __name__ == "__main__":
    from tasks_mtl.cli import main

    sys.argv = ["mtl", "train", *sys.argv[1:]]
    main()
