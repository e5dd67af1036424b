"""Mean and covariance of a FastDeconv layer's sampled im2col patches, as one autograd Function.

Autograd through ``unfold -> reshape -> mean -> subtract -> X^T X`` stores and copies the patch
matrix several times and its backward spends as long on bookkeeping (``neg``, ``div``, ``sub`` of
the whole matrix, ``col2im``) as on the product. Written out:

- forward: gather the patches once, straight into the block layout (for the default ``sampling_stride
  >= kernel`` the sampled patches do not overlap: one strided copy per kernel tap and block, no
  padded copy of the input, no ``im2col``, no transpose; tap-major, so each copy writes contiguous runs, with the
  statistics put back in the authors' feature order), centre them
  in place, and take the Gram matrix by blocks of its upper triangle (symmetric: a quarter of the products saved);
- backward: ``dX = Xc (G + G^T) / n + d_mean / n`` in one product and one in-place add, then a
  scatter back into the input (disjoint patches in one block, or in a channels-last input: the same strided
  copies reversed, no ``col2im``, no zero-filled gradient where the patches tile the whole input; interleaved
  blocks in NCHW: ``col2im``, as fast there as ``9 * blocks`` small copies).

Grouped convs keep their patches as ``(groups, nf, n)``, so every per-group product is a contiguous batched
one. Overlapping patches (PNASNet-A's 7x7 depthwise layers): ``unfold`` already puts a group's features next to
each other, one centring copy does the rest, and the backward undoes the permute before ``col2im`` (7-13% off
PNASNet-A's training step, interleaved A/B, against the transposed ``(n, C*49)`` matrix with strided per-group
views). Disjoint patches (3x3 depthwise and grouped layers, sampling stride 3): one strided copy per kernel tap
straight into that layout, and back (``_gather_disjoint_groups``). Grouped 1x1 layers keep ``(n, C)`` rows.

Autograd's backward also subtracts the column means of ``Xc (G + G^T) / n``; those are zero up to
rounding (``Xc``'s columns sum to zero), so leaving them out changes gradients by rounding only
(tests/test_patch_stats.py, against autograd through ``patch_statistics_reference``, the plain formula: 1e-12 in
float64; the parity fixtures still pass at 1e-9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ._common import stats_dtype


def channels_last(x: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out channels-last (and not also plain contiguous, as 1x1 images are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# Elements per partial sum of ``column_sum`` (its rows times the width): about 4 MB of float32 partial work.
COLUMN_SUM_CHUNK = 1 << 20


def _chunk_rows(matrix: torch.Tensor) -> int:
    """Rows per piece of a chunked pass over ``matrix`` (``COLUMN_SUM_CHUNK`` elements)."""
    return max(1, COLUMN_SUM_CHUNK // max(matrix.shape[1], 1))


class _ColumnSum(torch.autograd.Function):
    """Column sums of a 2-D matrix in float32 at least; the gradient is the incoming one, cast to the matrix's
    dtype and expanded over the rows (a stride-0 view: autograd adds it into the input's other gradients)."""

    @staticmethod
    def forward(ctx, matrix: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rows, ctx.dtype = matrix.shape[0], matrix.dtype
        dtype = torch.promote_types(matrix.dtype, torch.float32)
        # On a CPU, torch's sum over the rows of a large reduced-precision matrix into float32 runs at 1-2 GB/s
        # (11 ms for a (128, 64*32*32) bfloat16 batch, ResNet-18's first stage); a few rows at a time, partial sums
        # added in float32, it takes 1-5 ms.
        rows = _chunk_rows(matrix)
        if matrix.dtype == dtype or rows >= matrix.shape[0] or matrix.device.type != "cpu":
            return matrix.sum(0, dtype=dtype)
        out = matrix[:rows].sum(0, dtype=dtype)
        for start in range(rows, matrix.shape[0], rows):
            out.add_(matrix[start:start + rows].sum(0, dtype=dtype))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return grad.to(ctx.dtype).expand(ctx.rows, -1)


def column_sum(matrix: torch.Tensor) -> torch.Tensor:
    """The column sums of ``matrix`` (rows, width), in float32 at least (float64 stays float64), differentiable."""
    return _ColumnSum.apply(matrix)


def batch_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W) summed over the batch, as ``(C, H, W)`` in float32 at least, differentiable.

    The images are summed in memory order (channels-last as (H, W, C)), so the gradient, one image expanded over the
    batch, has the input's layout: a gradient in another layout made autograd's sum with the conv's input gradient
    several times slower (a copy to bfloat16 and a mixed-layout add of the whole batch)."""
    n, c, h, w = x.shape
    if channels_last(x):
        return column_sum(x.permute(0, 2, 3, 1).reshape(n, -1)).view(h, w, c).permute(2, 0, 1)
    return column_sum(x.contiguous().view(n, -1)).view(c, h, w)


@dataclass(frozen=True)
class PatchSampler:
    """How a layer samples patches: its im2col geometry and the authors' block layout.

    A patch vector of length ``C*kh*kw`` is split into ``C // block`` interleaved blocks of
    ``nf = kh*kw*block`` features; for ``groups == 1`` the blocks become extra rows of an
    ``(n * blocks, nf)`` matrix, for grouped convs the matrix is ``(n, C*kh*kw)``.
    """

    kernel: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    stride: int
    num_features: int
    grouped: bool

    def _disjoint(self) -> bool:
        # Patches taken every `stride` pixels are disjoint when the stride covers a whole (dilated) kernel.
        return self.kernel != (1, 1) and all(
            self.stride >= d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation, strict=True))

    def _grid(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - d * (k - 1) - 1) // self.stride + 1
            for s, p, d, k in zip(size, self.padding, self.dilation, self.kernel, strict=True)
        )

    def _valid(self, size: int, grid: int, offset: int) -> tuple[int, int]:
        """Grid positions [lo, hi) whose kernel tap at ``offset`` (dilated, minus padding) lies inside the input."""
        lo = -(offset // self.stride)  # first position with pos * stride + offset >= 0
        hi = (size - 1 - offset) // self.stride + 1 if size - 1 - offset >= 0 else 0
        return max(lo, 0), max(min(hi, grid), max(lo, 0))

    def _tap_windows(self, shape: torch.Size):
        """For each kernel tap (a, b) that reaches inside the input: the grid positions whose tap is inside
        (rows, cols of the patch grid) and the input pixels they read (rows, cols: strided slices)."""
        _, _, h, w = shape
        (kh, kw), (dh, dw), (ph, pw) = self.kernel, self.dilation, self.padding
        grid = self._grid((h, w))
        for a in range(kh):
            hs = self._valid(h, grid[0], a * dh - ph)
            for b in range(kw):
                ws = self._valid(w, grid[1], b * dw - pw)
                if hs[0] >= hs[1] or ws[0] >= ws[1]:
                    continue
                rows_in = slice(hs[0] * self.stride + a * dh - ph, (hs[1] - 1) * self.stride + a * dh - ph + 1,
                                self.stride)
                cols_in = slice(ws[0] * self.stride + b * dw - pw, (ws[1] - 1) * self.stride + b * dw - pw + 1,
                                self.stride)
                yield a, b, slice(*hs), slice(*ws), rows_in, cols_in

    def _taps(self, shape: torch.Size):
        """For each kernel tap (a, b) and channel residue c0: the slices linking input and patch matrix.

        The patch matrix is viewed (N, Hs, Ws, blocks, nf); feature ``p = c*kh*kw + a*kw + b`` of a patch sits
        at block ``p % blocks``, position ``p // blocks``. Channels ``c0, c0 + blocks, ...`` of one tap land
        ``kh*kw`` apart in one block, so each (tap, c0) is one strided copy: the tap-major layout's slot ``k`` is
        the first of those positions (``_tap_major_slots``).
        """
        for (grid_rows, grid_cols, g, k), source in self._tap_major_slots(shape):
            yield (grid_rows, grid_cols, g, slice(k, None, self.taps())), source

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of the sampled patches, differentiable, without the patch matrix: the batch summed once
        (every image is sampled at the same pixels), then one strided sum per kernel tap and channel (zero
        padding adds nothing); in the block layout a feature also averages over its blocks. A bfloat16 ``x`` is
        summed in float32 (``column_sum``: no float32 copy of the batch first)."""
        n, c = x.shape[:2]
        if self.kernel == (1, 1):
            pixels = self._sampled_pixels(x)
            sums, count = column_sum(pixels), pixels.shape[0]
        else:
            image = batch_sum(x)
            taps = {(a, b): image[:, rows, cols].sum((1, 2)) for a, b, _, _, rows, cols in self._tap_windows(x.shape)}
            outside = image.new_zeros(c)  # a tap that only ever reads padding
            kh, kw = self.kernel
            sums = torch.stack([taps.get((a, b), outside) for a in range(kh) for b in range(kw)], 1).view(-1)
            grid = self._grid(tuple(x.shape[2:]))
            count = n * grid[0] * grid[1]
        if not self.grouped:  # feature f of block g is patch element f * blocks + g
            sums = sums.view(self.num_features, -1).sum(1)
            count *= self._blocks(c)
        return sums / count

    def _pixel_index(self, shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and pixel index of every ``stride**2``-th pixel of the batch in (N, H, W) order: the authors'
        1x1 sample (``x.permute(1, 0, 2, 3).reshape(C, -1)[:, ::stride**2]``)."""
        n, _, h, w = shape
        flat = torch.arange(0, n * h * w, self.stride**2, device=device)
        return flat // (h * w), flat % (h * w)

    def _sampled_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 sample as a ``(pixels, C)`` matrix. Channels-last: a strided view. NCHW: gathered straight from
        the input (a permuted copy of the whole input first costs 4-8x as long: DenseNet-121's 1x1 layers see up
        to 1024 channels)."""
        if channels_last(x):
            return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])[:: self.stride**2]
        image, pixel = self._pixel_index(x.shape, x.device)
        return x.flatten(2)[image, :, pixel]

    def _blocks(self, channels: int) -> int:
        return 1 if self.grouped else channels * self.taps() // self.num_features

    def tap_major(self, channels: int) -> bool:
        """Whether ``gather(..., tap_major=True)`` orders each block's features tap-major for an input of
        ``channels``: disjoint ungrouped patches whose kernel's tap count is coprime to the number of blocks (3x3
        kernels with 1, 2, 4 or 8 blocks: every layer of the CIFAR ResNets at block 64).

        The authors' feature ``f = taps * c_hi + k`` of a block (``c_hi``: the channel over the number of blocks)
        goes to position ``k * block + c_hi``, so each (kernel tap, channel residue) fills a contiguous run of the
        block: one copy of every ``blocks``-th channel per pair, against a copy that writes every ``taps``-th
        element. ResNet-18's stages (64 to 512 channels: 1 to 8 blocks), channels-last, 2 threads, bfloat16 rows:
        gather 6.5/5.3/2.9/4.2 -> 2.0/3.6/2.2/3.1 ms, scatter 6.3/5.3/3.0/3.3 -> 1.6/3.8/2.4/2.6 ms; float32 rows:
        gather 14.3/8.9/5.1/5.6 -> 4.0/4.7/2.7/3.1 ms; the first stage in NCHW: 13.8 -> 10.1 and 13.2 -> 9.0 ms."""
        return self._disjoint() and not self.grouped and math.gcd(self.taps(), self._blocks(channels)) == 1

    def taps(self) -> int:
        """Kernel taps per channel: ``kh * kw``."""
        return self.kernel[0] * self.kernel[1]

    def block(self) -> int:
        """Channels per whitening block of an ungrouped layer: ``num_features // taps``."""
        return self.num_features // self.taps()

    def _tap_major_slots(self, shape: torch.Size):
        """For each kernel tap inside the input and channel residue ``c0`` (channels ``c0, c0 + blocks, ...``): the
        patch grid rows and columns it fills, its block ``g`` and slot ``k`` in the tap-major layout ``(n, Hs, Ws,
        blocks, taps, block)``, and the input's channel and pixel slices."""
        blocks, kw = self._blocks(shape[1]), self.kernel[1]
        for a, b, grid_rows, grid_cols, rows_in, cols_in in self._tap_windows(shape):
            for c0 in range(blocks):
                k, g = divmod(self.taps() * c0 + a * kw + b, blocks)  # patch element p's block and its f mod taps
                yield (grid_rows, grid_cols, g, k), (slice(c0, None, blocks), rows_in, cols_in)

    def gather(self, x: torch.Tensor, dtype: torch.dtype | None = None, tap_major: bool = False) -> torch.Tensor:
        """The sampled patches as a fresh contiguous matrix in the block layout, in ``dtype`` (default: ``x``'s);
        with ``tap_major`` where ``self.tap_major`` allows, each block's features in the tap-major order instead of
        the authors': the same matrix with its columns permuted (``swap_features``).

        The patches are converted as they are copied: a float32 matrix from a bfloat16 batch costs no float32 copy
        of the whole batch first (MobileNetV2's depthwise layers under bf16 autocast spent 18 ms a layer on it).
        Overlapping patches outnumber the input's elements, so there the input is converted before ``unfold``."""
        dtype = x.dtype if dtype is None else dtype
        if self._disjoint():
            n, c, h, w = x.shape
            blocks = self._blocks(c)
            grid = self._grid((h, w))
            nf = c * self.taps() // blocks
            tap_major = tap_major and self.tap_major(c)
            rows = x.new_empty(n, grid[0], grid[1], blocks, *((self.taps(), self.block()) if tap_major else (nf,)),
                               dtype=dtype)
            # Border patches reach into the zero padding: zero them first, the taps then fill what is inside.
            (lo_h, hi_h), (lo_w, hi_w) = self._inner_grid(grid, (h, w))
            rows[:, :lo_h].zero_(), rows[:, hi_h:].zero_(), rows[:, :, :lo_w].zero_(), rows[:, :, hi_w:].zero_()
            if tap_major:
                for (ph, pw, g, k), (cs, hi, wi) in self._tap_major_slots(x.shape):
                    rows[:, ph, pw, g, k].copy_(x[:, cs, hi, wi].permute(0, 2, 3, 1))
            else:
                for (ph, pw, g, f), (cs, hi, wi) in self._taps(x.shape):
                    rows[:, ph, pw, g, f].copy_(x[:, cs, hi, wi].permute(0, 2, 3, 1))
            return rows.view(-1, nf)
        if self.kernel == (1, 1):  # every pixel a patch: the authors sample every stride**2-th pixel of the batch
            rows = self._sampled_pixels(x).to(dtype)
        else:
            rows = F.unfold(x.to(dtype), self.kernel, self.dilation, self.padding, self.stride).transpose(1, 2)
            rows = rows.reshape(-1, rows.shape[-1])
        blocks = self._blocks(x.shape[1])
        if blocks > 1:
            rows = rows.reshape(-1, self.num_features, blocks).transpose(1, 2).reshape(-1, self.num_features)
        rows = rows.contiguous()
        if rows.untyped_storage().data_ptr() == x.untyped_storage().data_ptr():
            rows = rows.clone()  # a reshape that stayed a view of x: the caller centres the rows in place
        return rows

    def group_major(self) -> bool:
        """Whether a grouped conv's patches are gathered group by group (``gather_groups``): every grouped kernel
        but 1x1."""
        return self.grouped and self.kernel != (1, 1)

    def gather_groups(self, x: torch.Tensor, groups: int,
                      dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A grouped conv's patches, centred, as a fresh ``(groups, nf, n)`` tensor in ``dtype`` (default: ``x``'s),
        and their mean."""
        if self._disjoint():
            return self._gather_disjoint_groups(x, groups, dtype)
        n, c = x.shape[:2]
        # unfold's (N, C*kh*kw, L) holds group g's features at [g*nf, (g+1)*nf): only N moves inwards.
        cols = F.unfold(x.to(x.dtype if dtype is None else dtype), self.kernel, self.dilation, self.padding,
                        self.stride)
        patches = cols.view(n, groups, -1, cols.shape[-1]).permute(1, 2, 0, 3)
        mean = patches.mean((2, 3))
        rows = patches.new_empty(patches.shape)  # contiguous (an elementwise op would keep the permuted strides)
        torch.sub(patches, mean[:, :, None, None], out=rows)
        return rows.view(groups, patches.shape[1], -1), mean.reshape(-1)

    def _gather_disjoint_groups(self, x: torch.Tensor, groups: int,
                                dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``gather_groups`` for disjoint patches: one strided copy per kernel tap into a ``(C, kh*kw, N, Hs, Ws)``
        tensor, which is ``(groups, nf, n)`` as it lies (group g's features ``c*kh*kw + tap`` for its channels c).

        Against the ``(n, C*kh*kw)`` rows of ``gather`` and per-group products on their strided views, the batched
        Gram product and its backward read and write contiguous memory and the backward needs no transposing copy
        back to rows (MobileNetV2's first 144-channel depthwise layer under bf16 autocast, channels-last: 142 against
        234 ms for gather, statistics, backward products and scatter)."""
        n, c, h, w = x.shape
        grid = self._grid((h, w))
        taps = self.taps()
        rows = x.new_empty(c, taps, n, grid[0], grid[1], dtype=x.dtype if dtype is None else dtype)
        for tap, (rows_out, cols_out) in enumerate(self._tap_ranges(grid, (h, w))):
            # The grid positions whose tap falls on the zero padding (all of them for a tap that only reads padding).
            rows[:, tap, :, :rows_out[0]].zero_(), rows[:, tap, :, rows_out[1]:].zero_()
            rows[:, tap, :, :, :cols_out[0]].zero_(), rows[:, tap, :, :, cols_out[1]:].zero_()
        kw = self.kernel[1]
        for a, b, grid_rows, grid_cols, rows_in, cols_in in self._tap_windows(x.shape):
            rows[:, a * kw + b, :, grid_rows, grid_cols].copy_(x[:, :, rows_in, cols_in].transpose(0, 1))
        rows = rows.view(groups, -1, n * grid[0] * grid[1])
        mean = rows.mean(2)
        rows.sub_(mean.unsqueeze(2))
        return rows, mean.reshape(-1)

    def _tap_ranges(self, grid: tuple[int, int], size: tuple[int, int]):
        """For each kernel tap in order: the grid rows and columns [lo, hi) whose tap lies inside the input."""
        for a in range(self.kernel[0]):
            for b in range(self.kernel[1]):
                yield (self._valid(size[0], grid[0], a * self.dilation[0] - self.padding[0]),
                       self._valid(size[1], grid[1], b * self.dilation[1] - self.padding[1]))

    def _inner_grid(self, grid: tuple[int, int], size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
        """The grid rows and columns [lo, hi) whose every kernel tap lies inside the input (no padding read)."""
        ranges = list(self._tap_ranges(grid, size))
        return ((max(r[0][0] for r in ranges), min(r[0][1] for r in ranges)),
                (max(r[1][0] for r in ranges), min(r[1][1] for r in ranges)))

    def tiles(self, shape: torch.Size) -> bool:
        """Whether the sampled patches are disjoint and cover the whole input (``shape``), so their gradient is
        written whole, with no zero fill first."""
        size = (shape[2], shape[3])
        return self._disjoint() and self._covered(self._grid(size), size)

    def _covered(self, grid: tuple[int, int], size: tuple[int, int]) -> bool:
        """Whether the disjoint sampled patches tile the whole input (so a gradient written through them needs no
        zero fill first)."""
        return all(
            self.stride == k and d == 1 and g * self.stride - p >= s and p < self.stride
            for k, d, g, p, s in zip(self.kernel, self.dilation, grid, self.padding, size, strict=True)
        )

    def scatter_groups(self, rows: torch.Tensor, shape: torch.Size, layout: torch.memory_format,
                       dtype: torch.dtype | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """The input-shaped gradient of ``gather_groups`` for the ``(groups, nf, n)`` row gradients, in ``dtype``
        (default: ``rows``'s), converted as it is copied; with ``into`` (a dense gradient of the input's shape, dtype
        and layout), added into it in place and returned."""
        n, c, h, w = shape
        dtype = rows.dtype if dtype is None else dtype
        if self._disjoint():
            grid = self._grid((h, w))
            rows = rows.view(c, -1, n, grid[0], grid[1])
            grad = _gradient_buffer(into, shape, dtype, rows.device, layout, zeroed=not self._covered(grid, (h, w)))
            kw = self.kernel[1]
            for a, b, grid_rows, grid_cols, rows_in, cols_in in self._tap_windows(shape):
                _write(grad[:, :, rows_in, cols_in], rows[:, a * kw + b, :, grid_rows, grid_cols].transpose(0, 1),
                       into is not None)
            return grad
        cols = rows.view(*rows.shape[:2], n, -1).permute(2, 0, 1, 3).reshape(n, c * self.taps(), -1)
        grad = F.fold(cols, (h, w), self.kernel, self.dilation, self.padding, self.stride)
        return into.add_(grad) if into is not None else grad.to(dtype, memory_format=layout)

    def scatter(self, rows: torch.Tensor, shape: torch.Size, layout: torch.memory_format,
                dtype: torch.dtype | None = None, into: torch.Tensor | None = None,
                tap_major: bool = False) -> torch.Tensor:
        """The input-shaped gradient of ``gather`` for the row gradients ``rows`` (gather's adjoint; ``tap_major``:
        of the tap-major gather), in the input's memory ``layout`` (a gradient in another format slows every op it
        meets later) and in ``dtype`` (default: ``rows``'s), converted as it is copied; with ``into`` (a dense
        gradient of the input's shape, dtype and layout), added into it in place and returned."""
        dtype = rows.dtype if dtype is None else dtype
        n, c, h, w = shape
        blocks = self._blocks(c)
        width = c * self.taps()
        if tap_major and self.tap_major(c):
            grid = self._grid((h, w))
            rows = rows.view(n, grid[0], grid[1], blocks, self.taps(), -1)
            grad = _gradient_buffer(into, shape, dtype, rows.device, layout, zeroed=not self._covered(grid, (h, w)))
            for (ph, pw, g, k), (cs, hi, wi) in self._tap_major_slots(shape):
                _write(grad[:, cs, hi, wi], rows[:, ph, pw, g, k].permute(0, 3, 1, 2), into is not None)
            return grad
        # Disjoint patches: one strided copy per kernel tap and block, straight into the input's layout. With
        # interleaved blocks in NCHW, col2im's one pass is as fast as blocks*9 copies; in channels-last col2im
        # writes NCHW and the gradient then needs a transposing copy: the copies were 2.5-6x faster there
        # (ResNet-18's and DenseNet-121's interleaved layers at batch 128, float32 and bfloat16).
        if self._disjoint() and (blocks == 1 or layout == torch.channels_last):
            grid = self._grid((h, w))
            rows = rows.view(n, grid[0], grid[1], blocks, width // blocks)
            grad = _gradient_buffer(into, shape, dtype, rows.device, layout, zeroed=not self._covered(grid, (h, w)))
            for (ph, pw, g, f), (cs, hi, wi) in self._taps(shape):
                _write(grad[:, cs, hi, wi], rows[:, ph, pw, g, f].permute(0, 3, 1, 2), into is not None)
            return grad
        if blocks > 1:
            rows = rows.view(-1, blocks, self.num_features).transpose(1, 2)
        rows = rows.reshape(-1, width)
        if self.kernel == (1, 1):  # straight into the input's layout (no permuted copy of the whole gradient)
            grad = _gradient_buffer(into, shape, dtype, rows.device, layout, zeroed=True)
            if layout == torch.channels_last:
                _write(grad.permute(0, 2, 3, 1).view(-1, c)[:: self.stride**2], rows, into is not None)
                return grad
            image, pixel = self._pixel_index(shape, rows.device)
            flat = grad.view(n, c, h * w)
            if into is not None:  # the sampled pixels are distinct: a read, an add and a write back
                flat[image, :, pixel] = (flat[image, :, pixel] + rows).to(dtype)
            else:
                flat[image, :, pixel] = rows.to(dtype)
            return grad
        grid = self._grid((h, w))
        cols = rows.view(n, grid[0] * grid[1], width).transpose(1, 2)
        grad = F.fold(cols, (h, w), self.kernel, self.dilation, self.padding, self.stride)
        return into.add_(grad) if into is not None else grad.to(dtype, memory_format=layout)


def swap_features(t: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """``t``'s features, ordered (outer, inner) along its one dimension or both of its two, reordered (inner, outer):
    ``swap_features(t, block, taps)`` takes a block's features from the authors' order to the tap-major gather's
    (``PatchSampler.tap_major``), ``swap_features(t, taps, block)`` back."""
    d = outer * inner
    if t.dim() == 1:
        return t.view(outer, inner).mT.reshape(d)
    return t.view(outer, inner, outer, inner).permute(1, 0, 3, 2).reshape(d, d)


def _gradient_buffer(into: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype, device: torch.device,
                     layout: torch.memory_format, zeroed: bool) -> torch.Tensor:
    """Where a scatter writes: ``into`` (added to), else a fresh gradient, zero-filled where the patches leave gaps."""
    if into is not None:
        return into
    grad = torch.empty(shape, dtype=dtype, device=device, memory_format=layout)
    return grad.zero_() if zeroed else grad


def _write(target: torch.Tensor, values: torch.Tensor, add: bool) -> None:
    """``target += values`` (one rounding to ``target``'s dtype) or ``target = values``, in place."""
    if add:
        target.add_(values)
    else:
        target.copy_(values)


def dense_like(grad: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype,
               layout: torch.memory_format) -> bool:
    """Whether ``grad`` is a dense tensor of ``shape`` and ``dtype`` laid out as ``layout`` (every element its own
    memory), so a scatter may add into it in place."""
    if grad is None or grad.shape != shape or grad.dtype != dtype:
        return False
    return grad.stride() == torch.empty(shape, device="meta", memory_format=layout).stride()


def symmetric_gram(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """``alpha * X^T X + beta * I`` for ``X`` (n, d): the upper block triangle by products, mirrored below."""
    d = x.shape[1]
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    if d < 256 or x.device.type != "cpu":  # small matrices: one product is faster than three
        return torch.addmm(eye, x.mT, x, beta=beta, alpha=alpha)
    h = d // 2
    out = torch.empty(d, d, dtype=x.dtype, device=x.device)
    top, bottom = x[:, :h], x[:, h:]
    torch.addmm(eye[:h, :h], top.mT, top, beta=beta, alpha=alpha, out=out[:h, :h])
    torch.addmm(eye[h:, h:], bottom.mT, bottom, beta=beta, alpha=alpha, out=out[h:, h:])
    torch.mm(top.mT, bottom, out=out[:h, h:]).mul_(alpha)
    out[h:, :h] = out[:h, h:].mT
    return out


# Rows per partial product of ``reduced_gram``: each partial Gram is rounded to bfloat16 once, so more partials
# average the rounding down (the whitening matrix's error on ResNet-18's real activations, against float64:
# 1e-3 with one product, 2.5-5e-4 with 512-row partials, 2-3e-4 for float32 sums of exact products) while
# products of 512 rows still run at about twice the float32 rate (benchmarks/precision.py, docs/layers.md).
REDUCED_GRAM_ROWS = 512
# Below this many features a Gram product is too small for bfloat16 to pay: the chunks' many small products cost
# more than one float32 product of the rows (measured: 7.9 against 0.9 ms at 16 features, 2.8 against 2.1 at 64,
# 2.7 against 3.5 at 144; MobileNetV2's and EfficientNet-B0's 1x1 layers trained slower with bf16 whitening).
REDUCED_GRAM_MIN_FEATURES = 128


def reduced_gram(rows: torch.Tensor, alpha: float, beta: float, chunk: int = REDUCED_GRAM_ROWS) -> torch.Tensor:
    """``alpha * X^T X + beta * I`` in float32 for bfloat16 rows ``X`` (n, d). A CPU bfloat16 product returns
    bfloat16 (torch has no float32-output one on CPU), so the product is taken over ``chunk`` rows at a time and
    the rounded partial Grams are summed in float32; below ``REDUCED_GRAM_MIN_FEATURES`` features, one float32
    product of the rows."""
    d = rows.shape[1]
    if d < REDUCED_GRAM_MIN_FEATURES:
        return symmetric_gram(rows.float(), alpha, beta)
    out = torch.zeros(d, d, dtype=torch.float32, device=rows.device)
    # One whole product per chunk: symmetric_gram's upper block triangle (three products of half the width, a
    # quarter of the arithmetic saved) made the chunks' products smaller and slower (ResNet-18's first-stage patches,
    # (15488, 576): 32.8 against 28.4 ms, 12-15% on every stage's shape, the same error against float64).
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk]
        out.add_(torch.mm(part.mT, part))
    out = out.triu().add_(out.triu(1).mT)  # exactly symmetric: a product's two triangles may round differently
    out.mul_(alpha).diagonal().add_(beta)
    return out


def _reduced_rows_grad(rows: torch.Tensor, d_mean: torch.Tensor | None, d_cov: torch.Tensor | None,
                       n: int) -> torch.Tensor:
    """The gradient of centred bfloat16 ``rows`` for float32 gradients of their mean and Gram matrix, in bfloat16:
    ``rows @ (d_cov + d_cov^T) / n + d_mean / n`` as one bfloat16 product with the mean's row (rounded to bfloat16)
    as its bias, added to the products' float32 sums and rounded once: the bfloat16 gradient the bfloat16 input gets
    anyway. Adding the float32 row to the product's rounded output afterwards rounded twice (1.4x the error against
    float64) and, on a CPU, took as long again as the product (ResNet-18's (15488, 576) patch gradient: 19 ms
    against 11 ms for the product with its bias)."""
    bias = rows.new_zeros(rows.shape[1]) if d_mean is None else (d_mean / n).to(rows.dtype)
    if d_cov is None:
        return bias.expand(rows.shape).clone()
    return torch.addmm(bias, rows, ((d_cov + d_cov.mT) / n).to(rows.dtype))


def _authors_order(ctx, mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of tap-major rows (``ctx.tap_major``) in the authors' block feature order."""
    if not ctx.tap_major:
        return mean, cov
    taps, block = ctx.sampler.taps(), ctx.sampler.block()
    return swap_features(mean, taps, block), swap_features(cov, taps, block)


class _PatchStatistics(torch.autograd.Function):
    """Mean and covariance of ``x``'s sampled patches, taken from patch rows in ``dtype``: the input is read as it is
    (a bfloat16 batch under autocast is not copied to float32 first) and its gradient comes back in its own dtype.

    The third output is ``x`` itself, passed through: a layer that convolves it instead of ``x`` gets the patches'
    gradient added into the convolution's input gradient in place, where the sampled patches lie, instead of a
    second input-sized gradient (zero-filled wherever the sample leaves gaps, as it does for a 1x1 layer's every
    ninth pixel) that autograd then adds to the first."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, sampler: PatchSampler, eps: float, groups: int,  # type: ignore[override]
                dtype: torch.dtype):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not an input-sized zero tensor
        ctx.sampler, ctx.groups, ctx.shape, ctx.dtype = sampler, groups, x.shape, x.dtype
        ctx.layout = torch.channels_last if channels_last(x) else torch.contiguous_format
        # Disjoint ungrouped patches are gathered tap-major (faster copies) and their statistics put back in the
        # authors' feature order; the backward takes the gradients the other way.
        ctx.tap_major = sampler.tap_major(x.shape[1])
        if dtype == torch.bfloat16:  # reduced_patch_statistics: one whitening group, products in bfloat16
            rows = sampler.gather(x, dtype, tap_major=ctx.tap_major)
            n = ctx.n = rows.shape[0]
            mean = rows.mean(0, dtype=torch.float32)
            rows.sub_(mean.to(rows.dtype))
            cov = reduced_gram(rows, 1.0 / n, eps)
            ctx.save_for_backward(rows)
            return *_authors_order(ctx, mean, cov), x
        if sampler.group_major():
            rows, mean = sampler.gather_groups(x, groups, dtype)  # (groups, nf, n), centred
            n = rows.shape[2]
            per_group = rows
        else:
            rows = sampler.gather(x, dtype, tap_major=ctx.tap_major)
            mean = rows.mean(0)
            rows.sub_(mean)  # `rows` is this Function's own copy: centre it in place
            n = rows.shape[0]
            per_group = rows.view(n, groups, -1).transpose(0, 1).mT  # (groups, nf, n), strided
        if groups == 1:
            cov = symmetric_gram(rows, 1.0 / n, eps)
        else:
            eye = torch.eye(per_group.shape[1], dtype=rows.dtype, device=rows.device)
            cov = torch.baddbmm(eye.expand(groups, -1, -1), per_group, per_group.mT, beta=eps, alpha=1.0 / n)
        ctx.save_for_backward(rows)
        ctx.n = n
        return *_authors_order(ctx, mean, cov), x

    @staticmethod
    def backward(ctx, d_mean: torch.Tensor | None, d_cov: torch.Tensor | None,  # type: ignore[override]
                 d_through: torch.Tensor | None):
        if d_mean is None and d_cov is None:
            return d_through, None, None, None, None
        (rows,) = ctx.saved_tensors
        n, groups, group_major = ctx.n, ctx.groups, ctx.sampler.group_major()
        if ctx.tap_major:  # the gradients of the authors' order, taken to the rows' tap-major one
            taps, block = ctx.sampler.taps(), ctx.sampler.block()
            d_mean = None if d_mean is None else swap_features(d_mean, block, taps)
            d_cov = None if d_cov is None else swap_features(d_cov, block, taps)
        if rows.dtype == torch.bfloat16:  # reduced_patch_statistics: one bfloat16 product, mean gradient included
            d_rows = _reduced_rows_grad(rows, d_mean, d_cov, n)
        elif d_cov is None:
            d_rows = rows.new_zeros(rows.shape)
        elif group_major:
            d_rows = torch.bmm((d_cov + d_cov.mT) / n, rows)
        elif groups == 1:
            d_rows = rows @ ((d_cov + d_cov.mT) / n)
        else:
            per_group = rows.view(n, groups, -1).transpose(0, 1)
            d_rows = torch.bmm(per_group, (d_cov + d_cov.mT) / n).transpose(0, 1).reshape(n, -1)
        if d_mean is not None and rows.dtype != torch.bfloat16:
            d_rows.add_((d_mean / n).view(groups, -1, 1) if group_major else d_mean / n)
        # The passed-through input's gradient (the convolution's, fresh) takes the patches' gradient in place when it
        # is a plain dense tensor of the input's dtype and layout and the patches leave gaps (a 1x1 layer's sample, a
        # strided layer's): that saves a zero-filled input-sized gradient and adding it whole. Patches that tile the
        # input are written to a fresh gradient and added whole: a strided add into the convolution's gradient per
        # kernel tap was slower (PreAct ResNet-18 under bf16 autocast, channels-last: +6% on the step, interleaved).
        into = (d_through if dense_like(d_through, ctx.shape, ctx.dtype, ctx.layout)
                and not ctx.sampler.tiles(ctx.shape) else None)
        if group_major:
            grad = ctx.sampler.scatter_groups(d_rows, ctx.shape, ctx.layout, ctx.dtype, into=into)
        else:
            grad = ctx.sampler.scatter(d_rows, ctx.shape, ctx.layout, ctx.dtype, into=into, tap_major=ctx.tap_major)
        if d_through is not None and into is None:
            grad.add_(d_through)
        return grad, None, None, None, None


def patch_statistics_reference(x: torch.Tensor, sampler: PatchSampler, eps: float,
                               groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``patch_statistics`` computes, by the plain formula, for autograd to differentiate: the definition
    the fast paths are tested against (tests/test_patch_stats.py), slow and memory-hungry by design.

    The sampled patches are ``unfold(x, kernel, dilation, padding, stride)``, one row per patch (for a 1x1
    kernel: every ``stride**2``-th pixel of the batch in (N, H, W) order, as the authors sample it). Ungrouped,
    a row of ``C*kh*kw`` features is split into ``C*kh*kw // nf`` interleaved blocks (feature ``f`` of block
    ``g`` is element ``f * blocks + g``), each block one more row of ``nf = sampler.num_features``. Then
    ``mean`` is the mean row and ``cov = Xc^T Xc / n + eps I`` with ``Xc`` the centred rows; grouped, the mean
    covers all ``C*kh*kw`` features and ``cov`` is one ``nf x nf`` matrix per group (``groups x nf x nf``).
    """
    if sampler.kernel != (1, 1):
        rows = F.unfold(x, sampler.kernel, sampler.dilation, sampler.padding, sampler.stride).transpose(1, 2)
    else:
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])[:: sampler.stride**2]
    nf = sampler.num_features
    if groups == 1:
        blocks = rows.shape[-1] // nf
        rows = rows.reshape(-1, nf, blocks).transpose(1, 2).reshape(-1, nf)
    else:
        rows = rows.reshape(-1, rows.shape[-1])
    mean = rows.mean(0)
    centred = rows - mean
    eye = torch.eye(nf, dtype=x.dtype, device=x.device)
    if groups == 1:
        return mean, centred.mT @ centred / centred.shape[0] + eps * eye
    per_group = centred.view(-1, groups, nf).transpose(0, 1)
    return mean, per_group.mT @ per_group / per_group.shape[1] + eps * eye


def reduced_patch_statistics(x: torch.Tensor, sampler: PatchSampler, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``patch_statistics`` of one whitening group with the heavy products in bfloat16: the patches gathered and
    centred in bfloat16 (from ``x`` rounded to bfloat16, as a conv under CPU bf16 autocast reads it), the Gram
    matrix by ``reduced_gram`` (float32 sums of bfloat16 partial products) and its backward as one bfloat16
    product; mean and covariance come out in float32, the gradient in ``x``'s dtype."""
    return patch_statistics_through(x, sampler, eps, 1, reduced=True)[:2]


def patch_mean(x: torch.Tensor, sampler: PatchSampler) -> torch.Tensor:
    """The mean of the sampled patches alone (fast mode's steps between refreshes), differentiable."""
    return sampler.mean(x)


def patch_statistics(x: torch.Tensor, sampler: PatchSampler, eps: float,
                     groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (``nf``, or ``C*kh*kw`` grouped) and ``Cov + eps I`` (``nf x nf``, or ``groups x nf x nf``) of the
    sampled patches, in float32 at least (``stats_dtype``): a half-precision ``x`` is read as it is, its patches
    converted as they are gathered, and its gradient comes back in its own dtype."""
    return _PatchStatistics.apply(x, sampler, eps, groups, stats_dtype(x.dtype))[:2]


def patch_statistics_through(x: torch.Tensor, sampler: PatchSampler, eps: float, groups: int = 1,
                             reduced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``patch_statistics`` (``reduced``: ``reduced_patch_statistics``) and ``x`` passed through: convolve the third
    output instead of ``x``, and the patches' gradient is added into the convolution's input gradient in place."""
    if reduced and sampler.grouped:
        raise ValueError("patch_statistics_through: grouped convolutions keep float32 statistics")
    return _PatchStatistics.apply(x, sampler, eps, groups, torch.bfloat16 if reduced else stats_dtype(x.dtype))
