"""Build a model's modules in its dtype without touching torch's default dtype, which is the whole
process's: vLLM's loader sets it while loading, so another thread's new tensors come out in the model's
dtype meanwhile. Here a torch function mode, which is the constructing thread's own, gives the dtype to the
factory calls that name none, as `torch.device(...)` gives a device."""

import torch
from torch.overrides import TorchFunctionMode

# The factories a module's __init__ calls for its parameters and buffers, which give the default
# dtype when they name none. (Others, such as torch.tensor or torch.arange, infer theirs from their data.)
FLOAT_FACTORIES = frozenset((torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn))


class default_dtype(TorchFunctionMode):  # noqa: N801 (used as a context manager, as torch.device is)
    """`with default_dtype(torch.bfloat16): model = Model(args)`: parameters made without a dtype are bf16."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FLOAT_FACTORIES and kwargs.get("dtype") is None:
            kwargs["dtype"] = self.dtype
        return func(*args, **kwargs)
