"""Instructor-only tests: more hand-worked cases for the parts a student writes. tools/make_assignment.py
leaves this folder out of the student release; tools/grade.py runs it when it is there (tools/parts.json
names which test grades which part)."""

import torch

from common import get_fpn_location_coords, iou


def test_locations_of_a_non_square_level():
    # A 2 x 3 level of stride 16 (an input 32 high and 48 wide): row-major, x along the width.
    locations = get_fpn_location_coords({"p4": (1, 8, 2, 3)}, {"p4": 16})["p4"]
    expected = torch.tensor([[8.0, 8.0], [24.0, 8.0], [40.0, 8.0], [8.0, 24.0], [24.0, 24.0], [40.0, 24.0]])
    assert torch.equal(locations, expected)


def test_iou_of_touching_and_nested_boxes():
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    boxes2 = torch.tensor(
        [
            [10.0, 0.0, 20.0, 10.0],  # touches along an edge: no overlap
            [2.0, 2.0, 7.0, 7.0],  # nested: 25 / 100
            [5.0, 0.0, 15.0, 10.0],  # half overlapping: 50 / 150
        ]
    )
    torch.testing.assert_close(iou(boxes1, boxes2), torch.tensor([[0.0, 0.25, 1.0 / 3.0]]))
