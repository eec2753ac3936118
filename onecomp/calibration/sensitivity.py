"""How much the model's loss reacts to each decoder linear's output: the output half of a
Kronecker-factored Fisher, for planners that weigh a layer's error by its effect on the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed


def output_grad_squares(model, inspection, windows: torch.Tensor, progress: bool = False) -> dict:
    """``{linear name: G}`` with ``G_q = E[(∂L/∂y_q)²]`` per output channel ``q`` of every decoder linear.

    ``L`` is one window's summed next-token cross-entropy on ``model`` as it is (the fp model before
    planning), ``y`` the linear's output; the mean runs over every token of every window. One forward
    and one backward per window, weights frozen; under torchrun each rank takes its share of the
    windows and the sums are all-reduced. With ``E[x_p²]`` of the input, ``G_q · E[x_p²]`` is the
    diagonal Fisher of weight ``(q, p)`` when outputs' gradients and inputs are independent."""
    blocks = model.get_submodule(inspection.blocks_path)
    linears = {f"{info.prefix}.{rel}": blocks[info.index].get_submodule(rel)
               for info in inspection.blocks for rel in info.linears}
    sums = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}

    def keep(name):
        def add(g):  # returns None: the gradient flows on unchanged
            sums[name].add_(g.detach().double().square().flatten(0, -2).sum(0).cpu())

        def hook(module, args, out):
            out.register_hook(add)
        return hook

    device = next(model.parameters()).device
    frozen = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(keep(name)) for name, m in linears.items()]
    order = list(range(len(windows)))
    if distributed.active():
        order = [order[j] for j in distributed.shard(len(order))]
    from tqdm.auto import tqdm

    tokens = torch.zeros(1, dtype=torch.float64)
    try:
        for p in frozen:
            p.requires_grad_(False)
        with torch.enable_grad():
            for i in tqdm(order, desc="output gradients", unit="window", disable=None if progress else True, leave=False):
                ids = windows[i:i + 1].to(device)
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
                logits = model(inputs_embeds=embeds, use_cache=False).logits
                loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:], reduction="sum")
                loss.backward()
                tokens += ids.shape[1]
    finally:
        for h in handles:
            h.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    distributed.all_reduce_sum_(tokens)
    for s in sums.values():
        distributed.all_reduce_sum_(s)
    n = max(float(tokens), 1.0)
    return {name: (s / n).float() for name, s in sums.items()}
