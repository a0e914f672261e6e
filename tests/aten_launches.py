"""Which aten operations launch a kernel on a GPU: every one but those that only make views or
allocate. Counted by ``tests/test_launches.py`` and ``bench/costmodel.py``."""

NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
             "_unsafe_view", "_reshape_alias", "slice", "select", "as_strided", "t",
             "transpose", "permute", "expand", "unsqueeze", "squeeze", "view_as_real",
             "view_as_complex", "alias", "detach", "lift_fresh", "unbind", "split", "chunk",
             "resize_", "_neg_view", "_conj", "conj", "split_with_sizes"}


def launches_kernel(func) -> bool:
    """Whether the operator overload ``func`` (as a ``TorchDispatchMode`` sees it) launches
    a kernel."""
    return func.namespace == "aten" and func.__name__.split(".")[0] not in NO_KERNEL
