"""What one block of a UNet receives and returns during a forward pass, captured with hooks.

Block-wise fine-tuning (``snn.finetune``) and bias correction (``snn.calibrate``) both need a
block's inputs or output for a batch; a hook takes them and stops the forward right there, so
nothing after the block is computed.
"""


class _Captured(Exception):
    """Raised by a capture hook to stop the forward pass once the block's tensors are taken."""


def _run_until_captured(model, module, x, t, register):
    store = {}
    handle = register(module, store)
    try:
        model(x, t)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not store:
        raise RuntimeError("the block was not reached by the model's forward pass")
    return store


def block_inputs(model, block, x, t):
    """The positional and keyword inputs ``block`` receives when ``model(x, t)`` runs.

    For a ``SpikingUNet`` these are time-major folded tensors ``[T*B, ...]`` (e.g. a ResBlock's
    ``(h, temb)``, an up ResBlock's ``h`` already concatenated with its skip tensor). The forward
    stops at the block: nothing after it is computed. Returns ``(args, kwargs)``.
    """
    def register(module, store):
        def hook(_, args, kwargs):
            store["inputs"] = (args, kwargs)
            raise _Captured
        return module.register_forward_pre_hook(hook, with_kwargs=True)
    return _run_until_captured(model, block, x, t, register)["inputs"]


def block_output(model, block, x, t):
    """The output of ``block`` when ``model(x, t)`` runs; the forward stops right after it."""
    def register(module, store):
        def hook(_, args, output):
            store["output"] = output
            raise _Captured
        return module.register_forward_hook(hook)
    return _run_until_captured(model, block, x, t, register)["output"]
