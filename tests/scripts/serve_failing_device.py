"""``serve`` whose batched decode steps fail as after a CUDA device-side assert (a sequence alone decodes).

Used by ``tests/test_serve.py`` as the server's program: the patch is made on import, so that the inference worker,
spawned (it imports this file as ``__mp_main__``), has it too.
"""

import sys

import torch

from epas_lightning.inference.generate import Decoder

_step = Decoder.step


def _failing_in_a_batch(self, *args):  # noqa: ANN001, ANN002, ANN202
    if self.batch_size > 1:
        error = getattr(torch, "AcceleratorError", RuntimeError)
        raise error("CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported")
    return _step(self, *args)


Decoder.step = _failing_in_a_batch

if __name__ == "__main__":
    from epas_lightning.cli import main

    sys.exit(main(sys.argv[1:]))
