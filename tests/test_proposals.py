"""Point-grid prompting, best-of-three selection, IoU filtering, mask boxes and class NMS."""

import torch
from torchvision.ops import masks_to_boxes

from ntt_core.geometry import mask_boxes
from ntt_core.proposals import best_of_three, class_nms, point_grid, propose


def test_point_grid_is_linspace_plus_half_pixel():
    grid = point_grid(32, 1024)
    assert grid.shape == (1024, 2)
    assert grid[0].tolist() == [0.5, 0.5]
    assert grid[-1].tolist() == [1023.5, 1023.5]
    assert grid[1, 0].item() == torch.linspace(0, 1023, 32)[1].item() + 0.5  # x varies fastest
    assert grid[1, 1].item() == 0.5


class RecordingSegmenter:
    """Returns, for prompt k, three masks whose predicted IoUs are known functions of k."""

    input_size, mask_size = 16, 4

    def __init__(self):
        self.seen = []

    def segment_points(self, features, points):
        batch, count, _ = points.shape
        self.seen.append(points.clone())
        ids = points[..., 0] * 100 + points[..., 1]  # [B, P]
        logits = ids[:, :, None, None, None].expand(batch, count, 3, 4, 4).clone()
        logits[:, :, 1] += 0.25  # marks the second output
        iou = torch.stack([torch.full_like(ids, 0.3), torch.full_like(ids, 0.9), torch.full_like(ids, 0.5)], dim=2)
        iou[:, 0::2, 1] = 0.35  # even prompts: the best output has IoU 0.5 (index 2)
        if len(self.seen) == 1:
            iou[0, 1, :] = 0.4  # prompt 1 of image 0: best IoU exactly 0.4 -> dropped (<= threshold)
        return logits, iou

    def segment_best_points(self, features, points, iou_threshold):
        return best_of_three(*self.segment_points(features, points), iou_threshold)


def test_propose_decodes_every_prompt_including_the_remainder_and_filters():
    segmenter = RecordingSegmenter()
    points = point_grid(3, 16)  # 9 prompts, batch of 4 -> 4 + 4 + 1
    out = propose(segmenter, None, 2, points, prompt_batch_size=4, iou_threshold=0.4)
    assert [p.shape[1] for p in segmenter.seen] == [4, 4, 1]
    assert torch.equal(torch.cat([p[0] for p in segmenter.seen]), points)
    # image 1 keeps all 9 prompts; image 0 drops the prompt at IoU 0.4 exactly (strict threshold)
    assert out[1].logits.shape == (9, 4, 4) and out[0].logits.shape == (8, 4, 4)
    # odd prompts chose output 1 (IoU 0.9, marked +0.25); even prompts output 2 (IoU 0.5, unmarked)
    ids = points[:, 0] * 100 + points[:, 1]
    expected = torch.where(torch.arange(9) % 2 == 1, ids + 0.25, ids)
    assert torch.allclose(out[1].logits[:, 0, 0], expected)
    assert torch.allclose(out[1].sam_iou, torch.where(torch.arange(9) % 2 == 1, 0.9, 0.5))


def test_mask_boxes_match_torchvision():
    torch.manual_seed(0)
    masks = torch.rand(6, 20, 30) > 0.97
    masks[2] = False
    masks[2, 5, 7] = True
    masks = masks[masks.flatten(1).any(1)]
    assert torch.equal(mask_boxes(masks), masks_to_boxes(masks))


def test_class_nms_ranks_by_sam_iou_within_each_class():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float32)
    sam_iou = torch.tensor([0.5, 0.9, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    keep = class_nms(boxes, sam_iou, labels, 0.5, keep=10)
    assert keep.tolist() == [1, 2, 3]  # box 0 suppressed by box 1 of its class; box 2 is another class
    assert class_nms(boxes, sam_iou, labels, 0.5, keep=2).tolist() == [1, 2]
