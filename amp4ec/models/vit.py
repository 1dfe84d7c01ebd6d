"""Vision Transformer with torchvision's VisionTransformer names; FX-traceable, no torchvision import."""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

__all__ = ["EncoderBlock", "MLPBlock", "VisionTransformer", "vit_b_16", "vit_tiny"]

_LayerNorm = partial(nn.LayerNorm, eps=1e-6)


class MLPBlock(nn.Sequential):
    """Linear → GELU → Dropout → Linear → Dropout (indices 0..4, weights at 0 and 3)."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(
            nn.Linear(in_dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, in_dim),
            nn.Dropout(dropout),
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer layer: x + attn(ln_1(x)), then + mlp(ln_2(·))."""

    def __init__(
        self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, attention_dropout: float
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = _LayerNorm(hidden_dim)
        self.self_attention = nn.MultiheadAttention(
            hidden_dim, num_heads, dropout=attention_dropout, batch_first=True
        )
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = _LayerNorm(hidden_dim)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(input)
        # MultiheadAttention is an FX leaf returning a tuple; indexing keeps it inside this block.
        x = self.self_attention(x, x, x, need_weights=False)[0]
        x = self.dropout(x) + input
        y = self.mlp(self.ln_2(x))
        return x + y


class Encoder(nn.Module):
    """Position embedding, then ``layers`` (a Sequential of encoder_layer_{i}), then ``ln``."""

    def __init__(
        self,
        seq_length: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float,
        attention_dropout: float,
    ) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for i in range(num_layers):
            layers[f"encoder_layer_{i}"] = EncoderBlock(
                num_heads, hidden_dim, mlp_dim, dropout, attention_dropout
            )
        self.layers = nn.Sequential(layers)
        self.ln = _LayerNorm(hidden_dim)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    """Patchify (conv_proj) → prepend class_token → encoder → heads on the class token."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        dropout: float = 0.0,
        attention_dropout: float = 0.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.mlp_dim = mlp_dim
        self.num_classes = num_classes
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1  # + class token
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(
            seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout
        )
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        # torchvision zeroes the head (fine-tuning default); a zero head makes every output 0,
        # which would hide errors in split-vs-monolith checks, so use a small normal instead.
        nn.init.normal_(self.heads.head.weight, std=0.02)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: torch.Tensor) -> torch.Tensor:
        # Sizes come from x.shape (traced as getattr/getitem nodes), never from tensor values,
        # so the graph stays batch-generic and FX-traceable.
        n = x.shape[0]
        x = self.conv_proj(x)  # (n, hidden, n_h, n_w)
        x = x.reshape(n, self.hidden_dim, -1)
        return x.permute(0, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


def vit_tiny(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """A small ViT (patch 16, hidden 192, 6 layers, 3 heads, MLP 768) for tests and demos."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=16,
        num_layers=6,
        num_heads=3,
        hidden_dim=192,
        mlp_dim=768,
        num_classes=num_classes,
    )


def vit_b_16(num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """ViT-B/16 with torchvision's sizes (152 state_dict keys), so official weights load."""
    return VisionTransformer(
        image_size=image_size,
        patch_size=16,
        num_layers=12,
        num_heads=12,
        hidden_dim=768,
        mlp_dim=3072,
        num_classes=num_classes,
    )
