"""`python -m vgg_onnx.train ...` and `torchrun --nproc-per-node N -m vgg_onnx.train ...`: `vgg-onnx train`."""

import os
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


if __name__ == "__main__":
    main()
