"""Multi-magnification registration networks for histology patches (WBIR 2022), saving and loading.

A patch set is two views of one place: the *high* magnification patch (P x P) and the *low*
magnification view (the surrounding 2P x 2P region at half resolution, also P x P). The high view
goes through a U-Net; its decoder receives, at every scale, low-view features centre-cropped by 2
(the part that covers the high patch) and upsampled by a transposed convolution to the matching
size. ``magnifications=1`` drops the low view (the paper's single-magnification baseline).

Both kinds end in a dense displacement head (3x3 conv, 1x1 conv to 2 channels, in pixels);
``kind="nonrigid"`` returns it, ``kind="affine"`` returns its least-squares affine fit
(:func:`fit_affine`), one 2 x 3 matrix per patch about the patch centre. The last layer starts
at zero, so an untrained net gives the identity and leaves the images as they are.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...core.errors import InputError, UnsupportedFileError
from ...core.files import atomic_write_bytes, check_output_file
from ...core.options import check_choice, check_int, check_int_list

#: Written into every model file; :func:`load_model` refuses files without it.
FORMAT = "napari-nephi-histology-net"
FORMAT_VERSION = 1
_DATA = Path(__file__).resolve().parents[2] / "data"


@dataclass
class NetConfig:
    """What a :class:`MultiMagNet` is: head kind, number of magnifications, patch size, widths."""

    kind: str = "nonrigid"
    magnifications: int = 2
    patch: int = 224
    widths: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, ("affine", "nonrigid"))
        check_choice("magnifications", self.magnifications, (1, 2))
        widths = check_int_list("widths", list(self.widths), length=4, low=4, high=1024)
        if any(w % 4 for w in widths):
            raise InputError(f"Option widths must be multiples of 4, got {widths}.")
        self.widths = tuple(widths)
        self.patch = check_int("patch", self.patch, 32, 2048)
        if self.patch % 16:
            raise InputError(f"Option patch must be a multiple of 16 (e.g. 224), got {self.patch}.")

    def to_dict(self) -> dict:
        """Plain types only (lists, ints, strings), as stored in model files."""
        out = asdict(self)
        out["widths"] = list(self.widths)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> NetConfig:
        """The config stored by :meth:`to_dict`; unknown keys raise ``InputError``."""
        known = {"kind", "magnifications", "patch", "widths"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"Unknown network settings {unknown}; valid: {sorted(known)}.")
        data = dict(data)
        if "widths" in data:
            data["widths"] = tuple(data["widths"])
        return cls(**data)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // 4), channels)


def conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """Two [3x3 convolution, group norm, PReLU]; the first one with ``stride``."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1),
        _norm(cout),
        nn.PReLU(cout),
        nn.Conv2d(cout, cout, 3, padding=1),
        _norm(cout),
        nn.PReLU(cout),
    )


def up_block(cin: int, cout: int) -> nn.Sequential:
    """2x2 transposed convolution with stride 2, group norm, PReLU (doubles the size)."""
    return nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2), _norm(cout), nn.PReLU(cout))


class Encoder(nn.Module):
    """Four conv blocks, max-pooled between them; returns the features at sizes P, P/2, P/4, P/8."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        chans = (2, *widths)
        self.blocks = nn.ModuleList(conv_block(chans[i], chans[i + 1]) for i in range(len(widths)))
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else self.pool(x))
            feats.append(x)
        return feats


def centre_crop(x: torch.Tensor, rate: int = 2) -> torch.Tensor:
    """The central ``1/rate`` of the last two axes."""
    h, w = x.shape[-2:]
    ch, cw = h // rate, w // rate
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    return x[..., y0 : y0 + ch, x0 : x0 + cw]


class MultiMagNet(nn.Module):
    """U-Net on the high-magnification pair, fed low-magnification features in its decoder.

    ``forward(high, low=None)``: ``high`` and ``low`` are ``(N, 2, P, P)`` (channel 0 fixed,
    channel 1 moving). Affine nets return ``(N, 2, 3)`` pixel matrices mapping fixed ``(y, x)``
    about the patch centre to moving ``(y, x)`` about the centre; non-rigid nets return the
    displacement ``(N, 2, P, P)`` in pixels (moving = fixed + u).
    """

    def __init__(self, config: NetConfig | None = None):
        super().__init__()
        self.config = cfg = config or NetConfig()
        w = cfg.widths
        self.high = Encoder(w)
        low_w = [0] * len(w)
        if cfg.magnifications == 2:
            self.low = Encoder(w)
            low_w = [c // 2 for c in w]
            self.low_up = nn.ModuleList(up_block(c, c // 2) for c in w)
        self.up = nn.ModuleList(up_block(w[i + 1] + (low_w[i + 1] if i == 2 else 0), w[i]) for i in range(3))
        self.fuse = nn.ModuleList(conv_block(2 * w[i] + low_w[i], w[i]) for i in range(3))
        self.head = nn.Sequential(nn.Conv2d(w[0], w[0], 3, padding=1), _norm(w[0]), nn.PReLU(w[0]))
        self.out = nn.Conv2d(w[0], 2, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _check(self, high: torch.Tensor, low: torch.Tensor | None) -> None:
        p = self.config.patch
        if high.ndim != 4 or tuple(high.shape[1:]) != (2, p, p):
            raise InputError(f"The network takes (N, 2, {p}, {p}) patches, got {tuple(high.shape)}.")
        if self.config.magnifications == 2:
            if low is None or tuple(low.shape) != tuple(high.shape):
                got = None if low is None else tuple(low.shape)
                raise InputError(
                    f"This two-magnification network needs the low-magnification patches too, shaped "
                    f"like the high ones {tuple(high.shape)}; got {got}."
                )

    def forward(self, high: torch.Tensor, low: torch.Tensor | None = None) -> torch.Tensor:
        self._check(high, low)
        feats = self.high(high)
        extra: list[torch.Tensor | None] = [None] * 4
        if self.config.magnifications == 2:
            extra = [up(centre_crop(f)) for up, f in zip(self.low_up, self.low(low), strict=True)]
        x = feats[3] if extra[3] is None else torch.cat([feats[3], extra[3]], 1)
        for i in (2, 1, 0):
            parts = [feats[i], self.up[i](x)] + ([] if extra[i] is None else [extra[i]])
            x = self.fuse[i](torch.cat(parts, 1))
        field = self.out(self.head(x))
        return field if self.config.kind == "nonrigid" else fit_affine(field)


def fit_affine(field: torch.Tensor) -> torch.Tensor:
    """The least-squares affine ``(N, 2, 3)`` of patch displacements ``(N, 2, P, P)`` (about the centre).

    On the patch grid (symmetric about its centre) the normal equations are diagonal: the shift is
    the mean displacement and column ``j`` of the linear part is ``sum(u * r_j) / sum(r_j^2)``.
    A zero field gives the identity; an affine field is recovered exactly.
    """
    n, _, h, w = field.shape
    ry = torch.arange(h, dtype=field.dtype, device=field.device) - (h - 1) / 2.0
    rx = torch.arange(w, dtype=field.dtype, device=field.device) - (w - 1) / 2.0
    cy = (field * ry[:, None]).sum((2, 3)) / (w * ry.pow(2).sum())
    cx = (field * rx[None, :]).sum((2, 3)) / (h * rx.pow(2).sum())
    linear = torch.eye(2, dtype=field.dtype, device=field.device) + torch.stack([cy, cx], 2)
    return torch.cat([linear, field.mean((2, 3))[:, :, None]], 2)


def affine_displacement(matrices: torch.Tensor, patch: int) -> torch.Tensor:
    """``(N, 2, 3)`` patch matrices (about the patch centre) -> displacement ``(N, 2, P, P)`` in pixels."""
    if matrices.ndim != 3 or tuple(matrices.shape[1:]) != (2, 3):
        raise InputError(f"Affine patch matrices must be (N, 2, 3), got {tuple(matrices.shape)}.")
    c = (patch - 1) / 2.0
    r = torch.arange(patch, dtype=matrices.dtype, device=matrices.device) - c
    grid = torch.stack(torch.meshgrid(r, r, indexing="ij"))  # (2, P, P) relative (y, x)
    moved = torch.einsum("nij,jhw->nihw", matrices[:, :, :2], grid) + matrices[:, :, 2, None, None]
    return moved - grid[None]


def check_model_path(path) -> Path:
    """``path`` as a Path if a model file may be written there (its folder exists, it is not a folder)."""
    return check_output_file(path, "model file")


def model_record(net: MultiMagNet, *, half: bool = False, extra: dict | None = None) -> dict:
    """What :func:`save_model` writes: format tag, config, weights (float16 with ``half``), extra."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu()
        for k, v in net.state_dict().items()
    }
    record = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": net.config.to_dict(),
        "state_dict": state,
    }
    if extra:
        record["extra"] = extra
    return record


def save_record(record: dict, path) -> Path:
    """Write a model record (see :func:`model_record`) to ``path`` atomically."""
    p = check_model_path(path)
    buf = io.BytesIO()
    torch.save(record, buf)
    atomic_write_bytes(p, buf.getvalue())
    return p


def save_model(net: MultiMagNet, path, *, half: bool = False, extra: dict | None = None) -> Path:
    """Write config and weights of ``net`` in one file, atomically; ``extra`` must be plain data."""
    return save_record(model_record(net, half=half, extra=extra), path)


def read_record(path, device: torch.device | str = "cpu") -> dict:
    """The dict stored in a model file (``weights_only=True``), checked for the format tag."""
    p = Path(path)
    if not p.is_file():
        raise UnsupportedFileError(
            f"Model file {p} does not exist; give a file written by save_model or train."
        )
    try:
        record = torch.load(p, map_location=device, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's file problem
        raise UnsupportedFileError(
            f"Cannot read model file {p} ({type(exc).__name__}); it is not a model saved by napari-nephi."
        ) from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UnsupportedFileError(f"{p} is not a histology network file (no {FORMAT!r} tag).")
    if int(record.get("version", 0)) > FORMAT_VERSION:
        raise UnsupportedFileError(
            f"{p} was written by a newer napari-nephi (format version {record['version']}); "
            "upgrade to read it."
        )
    return record


def net_from_record(record: dict, device: torch.device | str = "cpu") -> MultiMagNet:
    """A float32 network in eval mode built from a record of :func:`read_record`."""
    net = MultiMagNet(NetConfig.from_dict(record["config"]))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in record["state_dict"].items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise UnsupportedFileError(f"The weights do not fit the stored network settings: {exc}") from exc
    return net.to(device).eval()


def load_model(path, device: torch.device | str = "cpu") -> MultiMagNet:
    """The network saved in ``path`` (by :func:`save_model` or training), on ``device``, in eval mode."""
    return net_from_record(read_record(path, device="cpu"), device)


def shipped_path(kind: str) -> Path:
    """Where the shipped weights of ``kind`` ("affine" or "nonrigid") live."""
    check_choice("kind", kind, ("affine", "nonrigid"))
    return _DATA / f"histology_{kind}.pt"


def shipped_model(kind: str, device: torch.device | str = "cpu") -> MultiMagNet | None:
    """The shipped network of ``kind`` (see ``scripts/make_histology_weights.py``), or None if absent."""
    path = shipped_path(kind)
    return load_model(path, device) if path.is_file() else None
