"""CLIP with a modified-ResNet image encoder and a causal text transformer, in plain PyTorch.

Written for clipmlr; compatible with the state dicts of OpenAI's released ResNet checkpoints (RN50, RN101,
RN50x4, RN50x16, RN50x64): every attribute keeps OpenAI's name, so their weights load with `strict=True`.
ViT checkpoints are not supported. Architecture: Radford et al., "Learning Transferable Visual Models From
Natural Language Supervision" (2021), Sec. 2.4; facts checked against openai/CLIP's `clip/model.py`.

Beyond OpenAI's model, `encode_dense` returns a feature for every spatial position (as DualCoOp does), and
`encode_embedded` runs the text transformer on token embeddings supplied by a prompt learner.

Shape key: B batch, T tokens, W width, D embedding dim, H×W grid, L = 1 + H*W positions.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """ResNet bottleneck where a stride > 1 is an average pool before the last conv (anti-aliasing)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            # OpenAI names the pool "-1" so the conv and norm keep the keys "downsample.0" / "downsample.1"
            self.downsample = nn.Sequential()
            self.downsample.add_module("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity())
            self.downsample.add_module("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False))
            self.downsample.add_module("1", nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        # in place: each ReLU and the residual sum reuse the buffer a BatchNorm just made, instead of
        # allocating another map as large (the same values; safe for autograd: BatchNorm's backward needs its
        # input only)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        out = self.bn3(self.conv3(self.avgpool(out)))
        out += x if self.downsample is None else self.downsample(x)
        return F.relu(out, inplace=True)


class AttentionPool2d(nn.Module):
    """Attention pooling: the spatial mean token attends to all tokens (QKV attention, one query)."""

    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.num_heads = num_heads

    def tokens(self, x):
        """(B, C, H, W) feature map -> (B, 1+H*W, C): mean token, then the grid row-major, plus positions."""
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1+HW, C)
        return x + self.positional_embedding_for(h, w).to(x.dtype)

    def positional_embedding_for(self, h, w):
        """(1+h*w, C) positions: the trained grid resized bicubically when the input grid differs."""
        pos = self.positional_embedding
        side = round(math.sqrt(pos.shape[0] - 1))
        if (h, w) == (side, side):
            return pos
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, C, side, side)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        grid = grid.flatten(2)[0].transpose(0, 1)  # (1, C, h, w) -> (hw, C)
        return torch.cat([pos[:1], grid], dim=0)  # (1+hw, C)

    def forward(self, x):
        x = self.tokens(x)  # (B, L, C)
        b, n, c = x.shape
        heads = self.num_heads
        q = self.q_proj(x[:, :1]).view(b, 1, heads, c // heads).transpose(1, 2)  # (B, heads, 1, C/heads)
        k = self.k_proj(x).view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, L, C/heads)
        v = self.v_proj(x).view(b, n, heads, c // heads).transpose(1, 2)  # (B, heads, L, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, 1, C/heads)
        return self.c_proj(out.transpose(1, 2).reshape(b, c))  # (B, C) -> (B, D)

    def dense(self, x):
        """(B, C, H, W) -> (B, 1+H*W, D): each position through v_proj and c_proj, no query/key attention.

        With one key, attention returns its value, so this is what the pool would output for a token that
        attended only to itself (DualCoOp, Sun et al. 2022, Sec. 3.3).
        """
        return self.c_proj(self.v_proj(self.tokens(x)))


class ModifiedResNet(nn.Module):
    """ResNet with a 3-conv stem, anti-aliased strided convs and an attention pool instead of a global
    pool."""

    def __init__(self, layers, output_dim, heads, input_resolution=224, width=64):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def trunk(self, x):
        """(B, 3, S, S) images -> (B, 32*width, S/32, S/32) layer4 map."""
        x = x.to(self.conv1.weight.dtype)
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        x = F.relu(self.bn3(self.conv3(x)), inplace=True)
        x = self.avgpool(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x):
        return self.attnpool(self.trunk(x))


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, mask=None):
        """(B, T, W) -> (B, T, W); `mask` (T, T) is added to the attention scores."""
        for block in self.resblocks:
            x = block(x, mask)
        return x


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.context_length = context_length
        self.visual = ModifiedResNet(vision_layers, embed_dim, vision_width * 32 // 64, image_resolution,
                                     vision_width)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = nn.LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation, so a randomly built model (the demo's) has sensible activations."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        pool = self.visual.attnpool
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            nn.init.normal_(proj.weight, std=pool.c_proj.in_features**-0.5)
        for stage in (self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    @property
    def embed_dim(self):
        return self.text_projection.shape[1]

    def causal_mask(self, t, device, dtype=torch.float32):
        """(T, T) additive mask: -inf above the diagonal, so token i sees tokens 0..i only. In the dtype of
        the activations: attention refuses (or mis-reads) a float mask of another float type."""
        return torch.full((t, t), float("-inf"), device=device, dtype=dtype).triu(1)

    def encode_image(self, image):
        """(B, 3, S, S) normalised images -> (B, D) pooled image features (not normalised)."""
        return self.visual(image)

    def encode_dense(self, image):
        """(B, 3, S, S) -> (B, 1+H*W, D): the mean token first, then every grid position row-major."""
        return self.visual.attnpool.dense(self.visual.trunk(image))

    def encode_embedded(self, x, eot, truncate=True):
        """Text features from token embeddings: (B, T, W) embeddings, (B,) EOT positions -> (B, D).

        The transformer is causal, so the feature at the EOT depends only on tokens 0..EOT; with `truncate`
        it runs on the first max(eot)+1 tokens only (CoOp prompts are ~20 of the 77 tokens). Same result.
        """
        if truncate:
            x = x[:, : int(eot.max()) + 1]  # (B, T', W)
        t = x.shape[1]
        x = x + self.positional_embedding[:t].to(x.dtype)
        x = self.transformer(x, self.causal_mask(t, x.device, x.dtype))
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # (B, W) at each EOT token
        return x @ self.text_projection.to(x.dtype)

    def encode_text(self, text, truncate=True):
        """(B, T) token ids from `tokenize` -> (B, D). The EOT token has the largest id in each row."""
        return self.encode_embedded(self.token_embedding(text), text.argmax(dim=-1), truncate)

    def forward(self, image, text):
        """OpenAI's contrastive logits: (B_image, B_text) scaled cosine similarities."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def _count_blocks(state_dict, prefix):
    return len({k.split(".")[2] for k in state_dict if k.startswith(prefix)})


def build_model(state_dict):
    """Builds a CLIP from a state dict alone: every hyper-parameter is read off the tensor shapes.

    Loads strictly and returns an fp32 model in eval mode. Raises ValueError for ViT or other checkpoints.
    """
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in ("input_resolution", "context_length", "vocab_size")}
    if "visual.proj" in state_dict or "visual.class_embedding" in state_dict:
        raise ValueError("this is a ViT CLIP checkpoint; clipmlr supports only the ResNet CLIPs "
                         "(RN50, RN101, RN50x4, RN50x16, RN50x64)")
    needed = ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding", "text_projection",
              "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise ValueError(f"not a CLIP ResNet state dict: missing keys {missing} "
                         f"(found {len(state_dict)} keys, e.g. {list(state_dict)[:3]})")
    vision_layers = [_count_blocks(state_dict, f"visual.layer{i}.") for i in (1, 2, 3, 4)]
    grid = round((state_dict["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    width = state_dict["ln_final.weight"].shape[0]
    model = CLIP(
        embed_dim=state_dict["text_projection"].shape[1],
        image_resolution=grid * 32,
        vision_layers=vision_layers,
        vision_width=state_dict["visual.layer1.0.conv1.weight"].shape[0],
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        transformer_width=width,
        transformer_heads=width // 64,
        transformer_layers=_count_blocks(state_dict, "transformer.resblocks."),
    )
    try:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    except RuntimeError as e:
        raise ValueError(f"the state dict does not fit the CLIP ResNet inferred from its shapes: "
                         f"{e}") from None
    return model.float().eval()
