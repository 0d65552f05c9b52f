"""DINO projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

With ``use_bn`` each hidden layer is batch-normalised (DINO's ``use_bn_in_head``): a hidden unit
then cannot answer the same for every image of a batch, which closes the head's shortcut to a
uniform collapse — answering flat teacher targets with a constant output whatever the backbone
sees. Small models trained briefly fall into it (see README, "A recipe that learns on CPU")."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = True,
        use_bn: bool = False,
    ):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim)]
        else:
            layers = []
            for layer_in in [in_dim] + [hidden_dim] * (nlayers - 2):
                layers.append(nn.Linear(layer_in, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        magnitude.data.fill_(1.0)
        # A fixed prototype norm stabilises training (DINO's norm_last_layer).
        magnitude.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
