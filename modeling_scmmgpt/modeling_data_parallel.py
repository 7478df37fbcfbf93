"""Data-parallel batches for stage 1's in-batch losses (contrastive, matching): every rank sees the global batch, as
BLIP-2's do, so N processes of batch B train like one process of batch N·B under DDP, FSDP or DeepSpeed."""

import torch


def data_parallel_world() -> tuple[int, int]:
    """(rank, world size) of the running process group (DDP, FSDP, DeepSpeed: one process per device), else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _GatherRows(torch.autograd.Function):
    """Every rank's rows of a tensor, concatenated in rank order (other dimensions padded to the largest rank's with
    `pad_value`), with the gradient of each rank's rows: backward sums what every rank computed for the gathered rows
    and hands each rank its own (BLIP-2's `all_gather_with_grad`; `torch.distributed.nn.all_gather` needs
    all_to_all, which gloo lacks). Ranks may hold different numbers of rows (a last, smaller batch)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
        dist, world = torch.distributed, torch.distributed.get_world_size()
        shape = torch.tensor(tensor.shape, device=tensor.device)
        shapes = [torch.empty_like(shape) for _ in range(world)]
        dist.all_gather(shapes, shape)
        shapes = torch.stack(shapes).tolist()
        largest = [max(column) for column in zip(*shapes)]
        padded = tensor.new_full(largest, pad_value)
        padded[tuple(slice(0, n) for n in tensor.shape)] = tensor
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        ctx.rows = sum(s[0] for s in shapes[: dist.get_rank()]), tensor.shape
        return torch.cat([part[: s[0]] for part, s in zip(parts, shapes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad)  # every rank's gradient for every gathered row, summed
        start, shape = ctx.rows
        return grad[(slice(start, start + shape[0]),) + tuple(slice(0, n) for n in shape[1:])], None


def gather_rows(tensor: torch.Tensor, world: int, pad_value: float = 0) -> torch.Tensor:
    """The global batch's `tensor` (see `_GatherRows`); `tensor` itself in a single process."""
    return tensor if world == 1 else _GatherRows.apply(tensor, pad_value)


__all__ = ["data_parallel_world", "gather_rows"]
