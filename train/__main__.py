"""`python -m vgg_onnx.train ...` and `torchrun --nproc-per-node N -m vgg_onnx.train ...`: `vgg-onnx train`."""

import os
import re
import sys

import click

from vgg_onnx.errors import VggOnnxError

from .cli import train_command


def main() -> None:
    rank = int(os.environ.get("RANK", "0"))
    try:
        train_command.main(args=sys.argv[1:], prog_name="python -m vgg_onnx.train", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        if rank == 0:
            e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except VggOnnxError as e:
        # under torchrun every rank meets the same error; one line is enough
        if rank == 0:
            click.echo(f"vgg-onnx: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except RuntimeError as e:
        if not lost_peer(e):
            raise
        # every process says it once: which one lost its peers matters when reading a node's log
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        click.echo(f"vgg-onnx: error: rank {rank}: lost contact with another training process ({first}); "
                   f"under torchrun --max-restarts N the agents restart the workers, which resume from the run's "
                   f"last checkpoint", err=True)
        sys.exit(1)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Done, and every file is saved. A worker skips the interpreter's teardown, where torch's communication
        # threads may still touch Python objects and abort the process ("terminate called without an active
        # exception": rare, once in a CI run, never in 60 two-node runs here), which torchrun takes for a failure:
        # it would restart the finished job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# what gloo and nccl say when a peer process died or cannot be reached
LOST_PEER = re.compile(r"gloo|nccl|Connection (closed|reset)|connectFullMesh|Broken pipe|timed out", re.IGNORECASE)


def lost_peer(error: RuntimeError) -> bool:
    """A collective failed because another process of the job is gone (a killed or preempted worker)."""
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or bool(LOST_PEER.search(str(error)))


if __name__ == "__main__":
    main()
