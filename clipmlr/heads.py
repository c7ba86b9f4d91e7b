"""The four heads compared in the PositiveCoOp paper (Rawlekar et al., WACV 2025, Sec. 3), on a frozen CLIP.

Every head maps dense image features (B, L, D) from `CLIP.encode_dense` to logits (B, C, 2), [..., 0] for the
presence of each class and [..., 1] for its absence, so the image encoder runs outside the head (and its
output can be cached).

    baseline : a linear map D -> 2C at every position, each channel aggregated with its own softmax (Sec. 3.1)
    dual     : a learned prompt for presence and one for absence, both through the text encoder (DualCoOp)
    positive : a learned presence prompt + a free absence embedding in feature space (PositiveCoOp, Sec. 3.2)
    negative : a learned absence prompt + a free presence embedding (NegativeCoOp, the mirror)

Prompts are CoOp's (Zhou et al. 2022): "[SOS] ctx_1 ... ctx_X <class name>. [EOS]" with X = n_ctx learned
vectors, one set per class by default. Shape key (the package's, see clipmlr/__init__.py): B batch, C classes,
D feature dim, L positions, T tokens, W text width, X context tokens.
"""
import torch
from torch import nn

from .aggregation import ABSENCE_WEIGHTS, aggregate, prompt_logits
from .clip import tokenize


class HeadError(ValueError):
    """A head that cannot be built from the arguments given
    (unknown name, a prompt longer than CLIP's context)."""


class Prompts(nn.Module):
    """Learned context vectors around fixed class-name tokens; `forward` gives their (C, D) text features."""

    def __init__(self, clip_model, classnames, n_ctx=16, class_specific=True):
        super().__init__()
        width = clip_model.token_embedding.weight.shape[1]
        shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
        self.ctx = nn.Parameter(torch.randn(shape) * 0.02)  # N(0, 0.02²), CoOp's initialisation
        ids = prompt_tokens(classnames, n_ctx, clip_model.context_length)  # (C, T)
        eot = ids.argmax(dim=-1)
        ids = ids[:, : int(eot.max()) + 1]  # nothing after the last EOT changes any EOT feature
        with torch.no_grad():
            # (C, T, W)
            embedded = clip_model.token_embedding(ids.to(clip_model.token_embedding.weight.device))
        self.register_buffer("prefix", embedded[:, :1].clone(), persistent=False)  # (C, 1, W): [SOS]
        self.register_buffer("suffix", embedded[:, 1 + n_ctx:].clone(), persistent=False)  # (C, T-1-X, W)
        self.register_buffer("eot", eot, persistent=False)  # (C,)

    def embeddings(self):
        """(C, T, W) token embeddings of the prompts, learned vectors in place of the placeholders."""
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(len(self.prefix), -1, -1)
        return torch.cat([self.prefix, ctx, self.suffix], dim=1)  # (C, 1+X+rest, W)

    def forward(self, clip_model):
        # already cut after the last EOT: truncate=False spares the host-device sync of finding it again
        return clip_model.encode_embedded(self.embeddings(), self.eot, truncate=False)  # (C, D)


def prompt_tokens(classnames, n_ctx, context_length=77):
    """(C, T) token ids of the prompts "X X ... X <name>." ("X" placeholders reserve one token each for the
    learned vectors); HeadError when the longest does not fit the text encoder's context (77 tokens for
    OpenAI's CLIPs)."""
    prompts = [" ".join(["X"] * n_ctx) + f" {name}." for name in classnames]
    lengths = tokenize(prompts, context_length=n_ctx + 1000).argmax(dim=-1) + 1  # (C,) to the EOT, inclusive
    need, c = int(lengths.max()), int(lengths.argmax())
    if need > context_length:
        raise HeadError(f"--n-ctx {n_ctx}: the prompt of {classnames[c]!r} needs {need} tokens, over the "
                        f"text encoder's {context_length}; give --n-ctx {n_ctx - (need - context_length)} "
                        f"or less")
    return tokenize(prompts, context_length=context_length)


class Frozen:
    """A module that a head uses but does not own. Not an nn.Module attribute, so it is none of the head's
    submodules: `head.train()` never puts it in training mode (a frozen CLIP's BatchNorm statistics would then
    move with every batch), `head.parameters()` and `head.state_dict()` leave its weights out (they are
    CLIP's, saved by OpenAI, not the head's), and DDP or an optimizer never see them. It is kept in eval mode,
    without gradients."""

    def __init__(self, module):
        self.module = module.eval().requires_grad_(False)


def frozen_encoder(model, device):
    """The frozen CLIP as a function: images (B, 3, S, S) -> dense features (B, L, D) fp32 on `device`, by
    `model.encode_dense` with no graph (nothing flows back into CLIP). On CUDA the convolutions run
    channels_last under bf16 autocast (about twice as fast; the features come back in fp32). run.py's loop,
    its feature cache, predict and the analyses all encode with this one function, so their features agree.
    With --pipeline device `images` is a RawBatch of file bytes, which `.to()` decodes and augments on the
    device."""
    device = torch.device(device)
    memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
    model.visual.to(memory_format=memory_format)

    def encode(images):
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                             enabled=device.type == "cuda"):
            return model.encode_dense(images.to(device, non_blocking=True,
                                                memory_format=memory_format)).float()
    return encode


class Head(nn.Module):
    """Shared plumbing: a frozen CLIP that is not the head's (see Frozen), and the spatial weights of the
    absence side (see `prompt_logits`)."""

    def __init__(self, clip_model, absence_weights="presence"):
        super().__init__()
        self.frozen = Frozen(clip_model)
        self.absence_weights = absence_weights

    @property
    def clip(self):
        return self.frozen.module

    def class_embeddings(self):
        """(presence (C, D), absence (C, D)) embeddings; fixed between optimizer steps, so evaluation can
        compute them once and call `logits` batch after batch."""
        raise NotImplementedError

    def groups(self):
        """{"prompt" | "embedding" | "linear": [parameters]}: which parameters are context vectors, free
        embeddings or the projector; each group has its own learning rate (Sec. 4)."""
        raise NotImplementedError

    def logits(self, features, embeddings):
        return prompt_logits(features, *embeddings, self.absence_weights)

    def forward(self, features):
        """(B, L, D) dense features -> (B, C, 2) logits."""
        return self.logits(features, self.class_embeddings())


class Baseline(Head):
    """No text at all: a linear projector D -> 2C at every position, then a per-channel softmax (Sec. 3.1)."""

    def __init__(self, clip_model, classnames, **unused):  # each channel has its own softmax by construction
        super().__init__(clip_model)
        self.proj = nn.Linear(clip_model.embed_dim, 2 * len(classnames))

    def class_embeddings(self):
        return None

    def groups(self):
        return {"linear": list(self.proj.parameters())}

    def logits(self, features, embeddings=None):
        a = self.proj(features)  # (B, L, 2C): presence channels first, then absence
        logits = aggregate(a, a)  # (B, 2C): every channel weighted by its own softmax over positions
        return logits.view(len(features), 2, -1).transpose(1, 2)  # (B, 2, C) -> (B, C, 2)


class DualCoOp(Head):
    """A learned presence prompt and a learned absence prompt per class, through the frozen text encoder."""

    def __init__(self, clip_model, classnames, n_ctx=16, class_specific=True, absence_weights="presence",
                 **unused):
        super().__init__(clip_model, absence_weights)
        self.presence_prompts = Prompts(clip_model, classnames, n_ctx, class_specific)
        self.absence_prompts = Prompts(clip_model, classnames, n_ctx, class_specific)

    def class_embeddings(self):
        return self.presence_prompts(self.clip), self.absence_prompts(self.clip)

    def groups(self):
        return {"prompt": [self.presence_prompts.ctx, self.absence_prompts.ctx]}


class PositiveCoOp(Head):
    """A learned presence prompt (plus a learned residual, as in the authors' code; `residual=False` leaves it
    out, as the paper describes the head) and a free absence embedding that never goes through the text
    encoder."""

    def __init__(self, clip_model, classnames, n_ctx=16, class_specific=True, absence_weights="presence",
                 residual=True):
        super().__init__(clip_model, absence_weights)
        shape = (len(classnames), clip_model.embed_dim)
        self.presence_prompts = Prompts(clip_model, classnames, n_ctx, class_specific)
        # N(0, 1), before normalising
        self.presence_residual = nn.Parameter(torch.randn(shape)) if residual else None
        self.absence = nn.Parameter(torch.randn(shape))  # N(0, 1)

    def class_embeddings(self):
        presence = self.presence_prompts(self.clip)
        return presence if self.presence_residual is None else presence + self.presence_residual, self.absence

    def groups(self):
        free = [self.absence] + ([] if self.presence_residual is None else [self.presence_residual])
        return {"prompt": [self.presence_prompts.ctx], "embedding": free}


class NegativeCoOp(Head):
    """The mirror of PositiveCoOp: a learned absence prompt (+ residual) and a free presence embedding."""

    def __init__(self, clip_model, classnames, n_ctx=16, class_specific=True, absence_weights="presence",
                 residual=True):
        super().__init__(clip_model, absence_weights)
        shape = (len(classnames), clip_model.embed_dim)
        self.absence_prompts = Prompts(clip_model, classnames, n_ctx, class_specific)
        self.absence_residual = nn.Parameter(torch.randn(shape)) if residual else None
        self.presence = nn.Parameter(torch.randn(shape))

    def class_embeddings(self):
        absence = self.absence_prompts(self.clip)
        return self.presence, absence if self.absence_residual is None else absence + self.absence_residual

    def groups(self):
        free = [self.presence] + ([] if self.absence_residual is None else [self.absence_residual])
        return {"prompt": [self.absence_prompts.ctx], "embedding": free}


HEADS = {"baseline": Baseline, "dual": DualCoOp, "positive": PositiveCoOp, "negative": NegativeCoOp}


def build_head(name, clip_model, classnames, n_ctx=16, class_specific=True, absence_weights="presence",
               residual=True):
    """A head by name (one of HEADS) for a frozen CLIP; only the head's own parameters are trainable.

    The defaults are the authors' code: class-specific context, the presence side's spatial weights for both
    sides, and PositiveCoOp's / NegativeCoOp's residual on. The baseline takes none of these options.
    """
    if name not in HEADS:
        raise HeadError(f"unknown head {name!r}; choose one of {sorted(HEADS)}")
    if n_ctx < 1:
        raise HeadError(f"n_ctx must be at least 1, got {n_ctx}")
    if absence_weights not in ABSENCE_WEIGHTS:
        raise HeadError(f"absence_weights {absence_weights!r}: choose one of {ABSENCE_WEIGHTS}")
    clip_model.requires_grad_(False)
    options = {} if name == "dual" else {"residual": residual}
    head = HEADS[name](clip_model, list(classnames), n_ctx=n_ctx, class_specific=class_specific,
                       absence_weights=absence_weights, **options)
    return head.to(clip_model.token_embedding.weight.device)


def parameter_groups(head, lr_prompt, lr_embedding, lr_linear):
    """SGD parameter groups with the paper's learning rates: context vectors, free embeddings, projector.

    The groups are the ones the head declares (`head.groups()`); a trainable parameter it leaves out, or puts
    in two groups, is an error: it would otherwise train at some other group's learning rate unnoticed.
    """
    lrs = {"prompt": lr_prompt, "embedding": lr_embedding, "linear": lr_linear}
    declared = head.groups()
    grouped = [id(p) for ps in declared.values() for p in ps]
    for name, p in head.named_parameters():
        if p.requires_grad and grouped.count(id(p)) != 1:
            raise ValueError(f"{type(head).__name__}.groups() puts the parameter {name!r} in "
                             f"{grouped.count(id(p))} groups; list it in exactly one of {sorted(lrs)}")
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in declared.items()]


def count_trainable(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
