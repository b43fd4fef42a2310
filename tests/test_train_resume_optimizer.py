"""Resuming an eager run's checkpoint into a --cuda_graph run keeps the capturable optimizer
(load_state_dict would reset capturable and leave the step counts where they were)."""

import torch

from fastpref.training.checkpoint import load_checkpoint, save_checkpoint
from fastpref.training.graph import check_capturable_optimizer


def test_resume_eager_checkpoint_into_capturable_optimizer(tmp_path):
    param = torch.nn.Parameter(torch.ones(3))
    eager = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones(3)
    eager.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(eager, lambda s: 1.0)
    path = save_checkpoint(
        tmp_path, 1, trainable={"w": param.detach()}, optimizer=eager, lr_scheduler=scheduler, data_position=4
    )
    graph_param = torch.nn.Parameter(torch.ones(3))
    captured = torch.optim.AdamW([graph_param], lr=torch.tensor(1e-3), capturable=True, foreach=False)
    graph_scheduler = torch.optim.lr_scheduler.LambdaLR(captured, lambda s: 1.0)
    load_checkpoint(path, captured, graph_scheduler)
    group = captured.param_groups[0]
    assert group["capturable"] is True and group["foreach"] is False
    step = captured.state[graph_param]["step"]
    assert torch.is_tensor(step) and step.dtype == torch.float32 and step.device == graph_param.device
    assert float(step) == 1.0
    check_capturable_optimizer(captured)  # what capture checks first
