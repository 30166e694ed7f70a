"""Why an image was flagged: for every defect region, the normal template that matched it best and where.

The forward matching already looks, for every query pixel, for its best match in a window of each template;
``forward_ATM(..., return_argmax=True)`` also says which template pixel that was. Over a region's cells at the
explanation layer, the template whose window maxima are highest on average is the region's nearest template
(the first of equal ones); the median displacement of the region's cells to their best pixels in it places the
region's box in that template. What an operator sees: the normal appearance the region failed to match.

Only flagged images are explained, at one layer (``explanation_layer``): the finest layer the image score sums,
where a place in the template is the most precise (``DEFAULT``: layer 2, stride 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import hetmm_kernels as hk

from .parameters import parse_params


def explanation_layer(params) -> str:
    """The finest active layer the image score is made of (every active layer when it names none) that has a
    forward window."""
    params = parse_params(params)
    named = params.image.layers or tuple(params.active_layers)
    usable = [layer for layer in sorted(named) if layer in params.active_layers and params.active_layers[layer].fore]
    if not usable:
        raise ValueError(f"the parameters give no layer with a forward window to explain with: {params}")
    return usable[0]


def explain_regions(result, query: torch.Tensor, templates: torch.Tensor, fore: int, sources: list) -> None:
    """Give every region of each flagged image of ``result`` (a decided ``Prediction``) its ``"nearest"``:
    ``{"template": index, "source": file or None, "box": [x0, y0, x1, y1], "similarity": mean cosine}``, the box
    in the template's map coordinates (those of the region's box). ``query [B, C, h, w]``: the images' features at
    the explanation layer; ``templates [T, C, h, w]``: the bank's there; ``fore``: its forward window.

    Only the regions' cells are matched, in a crop of the maps that holds their windows (a query pixel's window
    in the crop is its window in the map): one ``forward_ATM(..., return_argmax=True, pixels=...)`` an image."""
    radius = fore // 2
    for index in torch.nonzero(result.pred_label).flatten().tolist():
        regions = result.regions[index]
        if not regions:
            continue
        cells = [region_cells(result.pred_mask[index], region["box"], query.shape[-2:]) for region in regions]
        rows, cols = torch.nonzero(torch.stack(cells).any(0), as_tuple=True)
        y0, y1 = max(0, int(rows.min()) - radius), min(query.shape[-2], int(rows.max()) + 1 + radius)
        x0, x1 = max(0, int(cols.min()) - radius), min(query.shape[-1], int(cols.max()) + 1 + radius)
        crop = [cell[y0:y1, x0:x1] for cell in cells]
        wanted = torch.nonzero(torch.stack(crop).any(0).flatten()).flatten()  # flat crop pixels, ascending
        values, where = hk.forward_ATM(query[index:index + 1, :, y0:y1, x0:x1].float(),
                                       templates[:, :, y0:y1, x0:x1], fore, return_argmax=True,
                                       pixels=wanted.to(query.device))
        values, where = values[0].float().cpu(), where[0].cpu()  # [T, P]
        for region, inside in zip(regions, crop):
            chosen = torch.searchsorted(wanted, torch.nonzero(inside.flatten()).flatten())
            region["nearest"] = nearest(values[:, chosen], where[:, chosen], wanted[chosen], x1 - x0,
                                        region["box"], result.pred_mask.shape[-2:], query.shape[-2:], sources)


def region_cells(mask: torch.Tensor, box, grid) -> torch.Tensor:
    """``[h, w]`` bool: the cells of the layer's ``grid`` that the region (``mask`` within ``box``) touches; at
    least the cell under the box's centre."""
    x0, y0, x1, y1 = (int(v) for v in box)
    inside = torch.zeros(mask.shape, dtype=torch.float32)
    inside[y0:y1, x0:x1] = mask[y0:y1, x0:x1].float()
    cells = F.adaptive_max_pool2d(inside[None, None], tuple(grid))[0, 0] > 0
    if not cells.any():
        cells[min(grid[0] - 1, (y0 + y1) // 2 * grid[0] // mask.shape[0]),
              min(grid[1] - 1, (x0 + x1) // 2 * grid[1] // mask.shape[1])] = True
    return cells


def nearest(values: torch.Tensor, where: torch.Tensor, pixels: torch.Tensor, width: int, box, side, grid,
            sources: list) -> dict:
    """One region's nearest template: ``values``/``where [T, n]`` the window maxima and their places for the
    region's ``n`` cells, ``pixels`` those cells (flat, in a map ``width`` wide, as the places are); ``box`` the
    region's in map pixels (``side``), ``grid`` the layer's size."""
    similarity = values.mean(1)
    template = int(torch.argmax(similarity))  # the first of equal means
    places, rows, cols = where[template], pixels // width, pixels % width
    # the region's cells moved to their best pixels: the median move (the lower middle) places the box
    shift_y = float(torch.median(places // width - rows)) * side[0] / grid[0]
    shift_x = float(torch.median(places % width - cols)) * side[1] / grid[1]
    x0, y0, x1, y1 = (int(v) for v in box)
    moved = [min(max(round(x0 + shift_x), 0), side[1]), min(max(round(y0 + shift_y), 0), side[0]),
             min(max(round(x1 + shift_x), 0), side[1]), min(max(round(y1 + shift_y), 0), side[0])]
    return {"template": template, "source": sources[template], "box": moved, "similarity": float(similarity[template])}
