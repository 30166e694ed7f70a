"""ATMM scoring: per-layer mutual matching, then the fused weighted aggregation.

Isolation (a layer's ``i=`` weight): a template pixel whose structure the other templates rarely show
is far from every other template even though it is normal, so a query pixel showing that structure
would be far from the templates too. Each template pixel's leave-one-out dissimilarity (its
*isolation*) is added, times the weight, to every similarity it takes part in, in both directions.
It travels as one more feature channel (the query's is 1, the template's the weighted isolation), so
every backend computes it inside the same dot products at the cost of one channel.
"""

from __future__ import annotations

import math

import torch

import hetmm_kernels as hk
from hetmm_kernels.reference import MATCH_FLOOR  # the value every match map starts from

from .parameters import PostProcess, parse_params
from .selection import unit_means


ISOLATION_CHUNK = 8  # templates matched against the others per call


def leave_one_out(count: int, device=None) -> torch.Tensor:
    """``[count, count - 1]``: row ``t`` holds every index but ``t``, in order."""
    others = torch.arange(count - 1, device=device).expand(count, -1)
    return others + (others >= torch.arange(count, device=device)[:, None])


def template_isolation(temp, fore: int, neighbours: torch.Tensor | None = None) -> torch.Tensor:
    """``[T, h, w]`` float32: ``1 - `` each template pixel's best similarity to the *other* templates
    within the ``fore x fore`` window (forward matching, leave-one-out), floored at 0; 0 for one template.
    ``temp``: features, ``PreparedTemplates``, or ``QuantizedTemplates`` (int8 products, as predict's).

    ``neighbours [T, K]`` (optional): template ``t`` is compared with templates ``neighbours[t]`` only
    (its retrieved nearest images, as a query like it would be); they must not include ``t``.
    """
    quantized = isinstance(temp, hk.QuantizedTemplates)  # int8 products; the templates themselves as queries
    bank = temp if quantized else hk.prepare_templates(temp)
    queries = bank.dequantized().float() if quantized else bank.temp
    count, (height, width) = len(bank), bank.shape[2:]
    if neighbours is None:
        if count < 2:
            return torch.zeros(count, height, width)
        neighbours = leave_one_out(count, bank.device)
    elif (neighbours == torch.arange(count, device=neighbours.device)[:, None]).any():
        raise ValueError("neighbours: a template may not be its own neighbour (leave-one-out)")
    parts = []
    for start in range(0, count, ISOLATION_CHUNK):
        rows = slice(start, min(start + ISOLATION_CHUNK, count))
        best, _ = hk.mutual_match(queries[rows], bank, fore, 1, indices=neighbours[rows].to(bank.device))
        parts.append((1 - best.float()).clamp_min(0).cpu())
    return torch.cat(parts)


def share_of(total: int, percent: float) -> int:
    """``ceil(percent% of total)``, at least one and at most ``total`` (rounded first: 5% of 200 is 10, not 11)."""
    return max(1, min(total, math.ceil(round(total * percent / 100, 9))))


def coreset_size(pixels: int, percent: float) -> int:
    """How many of ``pixels`` template pixels a coreset of ``percent`` keeps (at least one)."""
    return share_of(pixels, percent)


# Templates whose coreset is selected together. Greedy k-centre costs (selected x candidate) pixels, which
# grows as N^2 over one bank; in groups of this many similar templates it grows as N (N = 1,000: 25 groups,
# each as costly as a 40-template bank), and a bank of up to this many is one group, as before.
CORESET_GROUP = 40


def template_coreset(temp, percent: float, group: int = CORESET_GROUP, progress: bool = False) -> torch.Tensor:
    """``[n]`` int64: the template pixels (flat indices over ``[T, h, w]``) that greedy k-centre selection
    keeps, ``coreset_size(T*h*w, percent)`` of them in all: first the pixel least similar to the templates'
    mean feature, then each next one the pixel least similar to every one kept so far (PatchCore's coreset, on
    unit features, cosine). The same pixels whatever the templates' order (an Engine shuffles them); the
    most isolated structure is kept first, the commonest only once.

    More than ``group`` templates are split into near-equal groups of similar templates (``similar_groups``)
    and each group keeps its share of the pixels, selected within the group: the cost grows linearly with
    the bank, and a query matched against its retrieved (similar) templates meets their jointly selected pixels.
    ``progress``: a bar over the groups.
    """
    bank = hk.prepare_templates(temp)
    count, _, height, width = bank.temp.shape
    if count <= group:
        return _greedy_k_centre(bank.temp, coreset_size(count * height * width, percent))
    members = similar_groups(bank.temp, -(-count // group))
    total = coreset_size(count * height * width, percent)
    sizes = [coreset_size(len(m) * height * width, percent) for m in members]
    sizes[-1] += total - sum(sizes)  # rounding: the whole bank's count, as one group would keep
    chosen, work = [], zip(members, sizes)
    if progress:  # N = 1,000 lite0 templates: 25 groups, ~15 s
        from tqdm import tqdm

        work = tqdm(work, total=len(members), desc="coreset", unit="group", leave=False)
    for templates, size in work:
        local = _greedy_k_centre(bank.temp[templates], max(1, min(size, len(templates) * height * width)))
        chosen.append(templates.to(local.device)[local // (height * width)] * (height * width) + local % (height * width))
    return torch.cat(chosen).cpu()


def _greedy_k_centre(temp: torch.Tensor, count: int) -> torch.Tensor:
    """``[count]`` int64 flat pixel indices over ``temp [T, C, h, w]``, by greedy k-centre (see above)."""
    rows = temp.permute(0, 2, 3, 1).reshape(-1, temp.shape[1]).float()
    chosen = torch.empty(count, dtype=torch.long, device=rows.device)
    nearest = torch.full((rows.shape[0],), -math.inf, device=rows.device)  # best similarity to the kept pixels
    index = (rows @ rows.mean(0)).argmin()
    for k in range(count):  # the argmin stays on the device: no synchronisation per step
        chosen[k] = index
        torch.maximum(nearest, rows @ rows[index], out=nearest)
        index = nearest.argmin()
    return chosen.cpu()


def similar_groups(temp: torch.Tensor, groups: int) -> list:
    """``groups`` near-equal lists (int64 tensors) of template indices, similar templates together: the templates
    in the order of their mean features along the direction those vary most (the top principal direction, its
    sign fixed by its largest component), cut into consecutive runs. Independent of the templates' order but for
    exact ties."""
    pooled = unit_means(temp)
    centred = pooled - pooled.mean(0)
    direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
    direction = direction * direction[direction.abs().argmax()].sign()
    order = torch.sort(centred @ direction, stable=True).indices
    return [part for part in torch.tensor_split(order, groups) if len(part)]


def coreset_rows(temp: hk.PreparedTemplates, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [n, C], owners [n])``: the (isolated) template pixels ``indices`` name, as ``hk.global_match``
    takes them, and the template each comes from."""
    count, channels, height, width = temp.temp.shape
    indices = indices.to(temp.temp.device)
    flat = temp.temp.permute(0, 2, 3, 1).reshape(-1, channels)
    return flat[indices].contiguous(), indices // (height * width)


CORESET_BLOCK = 1 << 22  # similarities per block of the per-query (indexed) coreset match


def coreset_match(query: torch.Tensor, coreset: tuple, indices: torch.Tensor | None = None,
                  gather: bool | None = None) -> torch.Tensor:
    """``[B, h, w]`` float32: each query pixel's best similarity to the coreset's rows (``coreset_rows``),
    with ``indices [B, K]`` to those of query b's templates only (-1 where it owns none).

    On the Triton path the indexed form masks the rows of other templates rather than gathering each query's
    own: nothing is read back from the device, so it runs inside a CUDA graph (retrieval's indices come from the
    GPU). On the torch path (``gather`` None: wherever the backend is not Triton) each query gathers its own rows, so the cost
    follows its templates' coreset, not the whole bank's.
    """
    rows, owners = coreset
    if indices is None:
        return hk.global_match(query, rows, out_dtype=torch.float32)
    batch, channels, height, width = query.shape
    if gather is None:  # the Triton path keeps everything on the device; the host path may read the indices
        gather = hk.backend.resolve(query.device, dtype=query.dtype) != "triton"
    if gather or isinstance(rows, hk.QuantizedRows):  # each query against its own rows only
        best = torch.full((batch, height, width), MATCH_FLOOR, device=query.device)
        for b in range(batch):
            mine = torch.isin(owners, indices[b].to(owners.device))
            own = rows.take(mine) if isinstance(rows, hk.QuantizedRows) else rows[mine]
            if len(own):
                best[b] = hk.global_match(query[b:b + 1], own, out_dtype=torch.float32)[0]
        return best
    mine = (owners[None, :, None] == indices.to(owners.device)[:, None, :]).any(-1)  # [B, n]
    pixels = query.permute(0, 2, 3, 1).reshape(batch, height * width, channels).to(rows.dtype)
    best = torch.full((batch, height * width), MATCH_FLOOR, device=query.device)
    step = max(1, CORESET_BLOCK // (batch * height * width))
    for start in range(0, rows.shape[0], step):
        sims = torch.matmul(pixels, rows[start:start + step].t()).float()  # [B, hw, s]
        sims.masked_fill_(~mine[:, None, start:start + step], MATCH_FLOOR)
        torch.maximum(best, sims.amax(-1), out=best)
    return best.view(batch, height, width)


def _channels_with_isolation(channels: int, device: torch.device) -> int:
    # one more channel; on CUDA a multiple of 16: the JIT specialises a channel count divisible by 16,
    # and without that hint lite0's layer 3 (113 or 120 channels) compiles to scalar loads and spills
    # ~900 bytes on sm_90 (kstats; 128 channels: 16-byte cp.async, 217 registers, no spill, as at 112)
    return channels + 1 if device.type != "cuda" else -(-(channels + 1) // 16) * 16


def _with_channels(features: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    joined = torch.cat([features, extra], 1)
    return joined.contiguous(memory_format=torch.channels_last) if features.dim() == 4 and \
        features.is_contiguous(memory_format=torch.channels_last) else joined.contiguous()


def isolated_templates(temp: torch.Tensor, isolation: torch.Tensor, weight: float) -> hk.PreparedTemplates:
    """Templates with ``weight * isolation`` as an extra channel (see the module docstring)."""
    count, channels, height, width = temp.shape
    extra = temp.new_zeros(count, _channels_with_isolation(channels, temp.device) - channels, height, width)
    extra[:, 0] = weight * isolation.to(temp.device, torch.float32)
    return hk.prepare_templates(_with_channels(temp, extra))


def with_unit_channel(query: torch.Tensor, channels: int) -> torch.Tensor:
    """The query padded to ``channels`` with a first extra channel of ones (it meets the isolation)."""
    batch, own, height, width = query.shape
    extra = query.new_zeros(batch, channels - own, height, width)
    extra[:, 0] = 1
    return _with_channels(query, extra)


class LayerMatches:
    """Each active layer's fore and back maxima ``[B, h, w]`` with its alpha and lambda.

    For a layer with an isolation weight, ``temp_feats[layer]`` may already carry the isolation channel
    (``isolated_templates``, as the detector's bank caches it); plain templates get theirs computed here.
    For a layer with a coreset, ``coresets[layer]`` may hold its rows (``coreset_rows`` of those templates,
    as the bank caches them); otherwise they are selected here. With ``indices``, a query meets only the
    coreset pixels of its own templates (leave-one-out calibration stays leave-one-out).
    """

    def __init__(self, query_feats: dict, temp_feats: dict, params, indices: torch.Tensor | None = None,
                 coresets: dict | None = None):
        params = parse_params(params)
        self.layers, self.fores, self.backs, self.alphas, self.ldas = [], [], [], [], []
        for layer, p in params.active_layers.items():
            if layer not in query_feats or layer not in temp_feats:
                raise KeyError(f"params use {layer}, but the features have {sorted(query_feats)} / {sorted(temp_feats)}")
            query, temp = query_feats[layer], temp_feats[layer]
            if isinstance(temp, hk.QuantizedTemplates):  # int8 products: the isolation travels as the bias
                if p.isolation and temp.bias is None:
                    raise ValueError(f"{layer} has an isolation weight, but its quantised templates carry no bias")
            elif p.isolation:
                if temp.shape[1] == query.shape[1]:
                    temp = isolated_templates(hk.prepare_templates(temp).temp, template_isolation(temp, p.fore),
                                              p.isolation)
                query = with_unit_channel(query, temp.shape[1])
            # float32 maps: the products' float32 maxima, not rounded to a 16-bit query's dtype
            fore, back = hk.mutual_match(query, temp, p.fore, p.back, indices=indices, out_dtype=torch.float32)
            if p.coreset:
                coreset = (coresets or {}).get(layer)
                if coreset is None:
                    temp = hk.prepare_templates(temp)
                    coreset = coreset_rows(temp, template_coreset(temp.temp[:, :query_feats[layer].shape[1]], p.coreset))
                fore = torch.maximum(fore, coreset_match(query, coreset, indices))
            if p.isolation:  # as close as a template's own neighbour or closer: 0, as an exact match scores
                fore, back = fore.clamp_max(1), back.clamp_max(1)
            self.layers.append(layer)
            self.fores.append(fore)
            self.backs.append(back)
            self.alphas.append(p.alpha)
            self.ldas.append(p.lda)

    def aggregate(self, out_size, post: PostProcess = PostProcess(), image_score=None) -> hk.Aggregated:
        """The anomaly map at ``out_size`` of the layers ``post`` names (all when it names none), blurred
        as ``post`` says, with an optional image score."""
        blur = (post.sigma, post.k) if post.kind == "blur" else None
        if any(layer not in self.layers for layer in post.layers):
            raise KeyError(f"the map sums {list(post.layers)}, but the matches are of {self.layers}")
        chosen = [i for i, layer in enumerate(self.layers) if not post.layers or layer in post.layers]
        return hk.aggregate_maps(*([values[i] for i in chosen] for values in (self.fores, self.backs, self.alphas,
                                                                               self.ldas)),
                                 out_size, blur=blur, image_score=image_score)

    def image_scores(self, out_size, post: PostProcess) -> torch.Tensor:
        """``[B]``: the maximum of the post-processed map, the mean of its highest ``post.top`` percent, or
        for ``mp`` the mean of its k x k max-pool."""
        if post.kind == "mp":
            return self.aggregate(out_size, PostProcess(layers=post.layers), image_score=post.k).scores
        if post.top:
            return top_mean(self.aggregate(out_size, post).maps, post.top)
        return self.aggregate(out_size, post, image_score="max").scores


def top_mean(maps: torch.Tensor, percent: float) -> torch.Tensor:
    """``[B]`` float32: the mean of each map's highest ``ceil(percent / 100 * pixels)`` values (at least one)."""
    flat = maps.flatten(1)
    return flat.topk(share_of(flat.shape[1], percent), dim=1, sorted=False).values.float().mean(1)


def atmm_score(query_feats: dict, temp_feats: dict, params, out_size=256) -> torch.Tensor:
    """Anomaly map ``[B, 1, H, W]`` (float32) of already-extracted, L2-normalised features.

    For each layer whose windows are non-zero: ``fore, back = mutual_match(...)``, both
    turned into dissimilarities ``1 - x``, upsampled bilinearly (align_corners=True) to
    ``out_size`` and summed as ``lambda * (alpha * fore + (1 - alpha) * back)``; a layer with an
    isolation weight computes its templates' isolation here (the detector keeps it in the bank).
    ``temp_feats`` values may be raw ``[N, C, h, w]`` tensors or ``PreparedTemplates``.
    """
    return LayerMatches(query_feats, temp_feats, params).aggregate(out_size).maps
