"""The errors of checkpoint files, shared by the modules that write, read and check them.

:class:`CheckpointError` is public (``framework.CheckpointError``): a checkpoint that cannot be
used, with what is wrong and what to do. :class:`CorruptCheckpointError` is the kind that
``resume="auto"`` may skip for an older checkpoint: the checkpoint's own files are damaged,
incomplete or malformed (a failed hash, a truncated file, a wrong type), and nothing of it was
applied. Everything else (a checkpoint of another configuration, say) stops ``"auto"`` too:
skipping it would silently resume something else.

Example::

    try:
        framework.load_weights(model, "runs/x")
    except CheckpointError as e:
        print(e)
"""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with what is wrong and what to do.

    Example::

        with pytest.raises(framework.CheckpointError, match="manifest.json"):
            Engine(resume="runs/x/checkpoints/step-00000010", ...).fit(...)
    """


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged, incomplete or malformed; the message names the file
    (and the key). Nothing of it was applied, so ``resume="auto"`` may fall back to an older one.

    Example::

        except CorruptCheckpointError as e:
            warnings.warn(f"skipping: {e}")
    """
