import time
from fiftyone import ViewField as F
from fiftyone_scenes import scenes_dataset


def test_scratch(app, tmp_path):
    ds = scenes_dataset(tmp_path, count=6, size=(96, 128), references=0)
    ds.name = "scratch"
    page = app.page
    app.open(ds)
    page.get_by_test_id("fo-grid").get_by_test_id("looker").first.click(position={"x": 10, "y": 50})
    modal = page.get_by_test_id("modal")
    modal.locator("[canvas-loaded='true']").wait_for()
    canvas = modal.get_by_test_id("looker").last
    box = canvas.bounding_box()
    print(box)
    sample = ds.first()
    w, h = sample.metadata.width if sample.metadata else 128, 96
    w, h = 128, 96
    scale = min(box["width"] / w, box["height"] / h)
    ox = box["x"] + (box["width"] - w * scale) / 2
    oy = box["y"] + (box["height"] - h * scale) / 2
    dets = sample.gt.detections[:2]
    for d in dets:
        x, y, bw, bh = d.bounding_box
        px, py = ox + (x + bw / 2) * w * scale, oy + (y + bh / 2) * h * scale
        page.mouse.click(px, py)
        page.wait_for_timeout(300)
    app.screenshot("modal-selected")
    print(modal.get_by_test_id("action-manage-selected").all_inner_texts() if modal.get_by_test_id("action-manage-selected").count() else "no manage")
    modal.get_by_test_id("action-tag-sample-labels").click()
    page.wait_for_timeout(800)
    app.screenshot("modal-tagger")
    inp = page.get_by_test_id("label-tag-input")
    inp.fill("reference")
    inp.press("Enter")
    page.wait_for_timeout(500)
    app.screenshot("modal-tag-typed")
    print([e.get_attribute("data-cy") for e in page.locator("[data-cy^='button-']").all()])
    page.get_by_test_id("button-Apply").click()
    page.wait_for_timeout(1500)
    app.screenshot("modal-tagged")
    ds.reload()
    print(ds.count_label_tags(), [d.id for d in dets], [d.id for d in ds.filter_labels("gt", F("tags").contains("reference")).values("gt.detections", unwind=True)])
