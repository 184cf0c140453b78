"""Prompt sets: the bundled toy set, every supported file format, stable ids, one-line failures."""

import json

import pytest

from cdmbench.errors import CdmbenchError
from cdmbench.prompts import load_prompt_set
from cdmbench.toy.shapes import PROMPT_SET_VERSION, eval_prompts
from cdmbench.types import ATTRS


def texts(prompts):
    return [p.text for p in prompts]


def ids(prompts):
    return [p.id for p in prompts]


def test_default_and_toy_are_the_fixed_versioned_toy_set():
    for name in ("default", "toy"):
        prompts = load_prompt_set(name, "toy")
        assert prompts == eval_prompts() and len(prompts) == 96
        assert prompts[0].id == f"{PROMPT_SET_VERSION}-000" and prompts[0].meta[ATTRS] is not None


@pytest.mark.parametrize("arch", ["sd3", "longcat"])
def test_real_backbones_have_no_default_set(arch):
    with pytest.raises(CdmbenchError, match=f"backbone '{arch}' has no bundled default prompt set; pass a prompt file"):
        load_prompt_set("default", arch)


def test_txt_one_prompt_per_line_ids_follow_lines(tmp_path):
    f = tmp_path / "drawbench test.txt"
    f.write_text("a red cube\n\n  a cat on a mat  \nthe sky\n")
    prompts = load_prompt_set(str(f), "sd3")
    assert texts(prompts) == ["a red cube", "a cat on a mat", "the sky"]
    assert ids(prompts) == ["drawbench-test-0", "drawbench-test-2", "drawbench-test-3"]  # blank line 1 keeps ids stable
    assert all(p.meta == {} for p in prompts)


def test_jsonl_objects_and_strings(tmp_path):
    f = tmp_path / "hps.jsonl"
    f.write_text(json.dumps({"caption": "pick a pic", "id": 7}) + "\n" + json.dumps({"prompt": "hps style"}) + "\n"
                 + json.dumps("a bare string") + "\n")
    assert texts(load_prompt_set(f, "sd3")) == ["pick a pic", "hps style", "a bare string"]
    assert ids(load_prompt_set(f, "sd3")) == ["hps-0", "hps-1", "hps-2"]


def test_json_list_coco_annotations_and_style_dict(tmp_path):
    lst = tmp_path / "anime.json"
    lst.write_text(json.dumps(["one", "two"]))
    assert texts(load_prompt_set(lst, "sd3")) == ["one", "two"]
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"images": [], "annotations": [{"image_id": 1, "id": 5, "caption": "A man riding a horse."},
                                                               {"image_id": 2, "id": 9, "caption": "Two dogs."}]}))
    prompts = load_prompt_set(coco, "sd3")
    assert texts(prompts) == ["A man riding a horse.", "Two dogs."] and ids(prompts)[1] == "captions_val2014-1"
    styles = tmp_path / "hpsv2.json"
    styles.write_text(json.dumps({"anime": ["a", "b"], "photo": ["c"]}))
    assert ids(load_prompt_set(styles, "sd3")) == ["hpsv2-anime-0", "hpsv2-anime-1", "hpsv2-photo-0"]


def test_csv_and_tsv_caption_columns(tmp_path):
    draw = tmp_path / "DrawBench.csv"
    draw.write_text('Prompts,Category\n"A red colored car, parked",Colors\nA black cat,Colors\n')
    assert texts(load_prompt_set(draw, "sd3")) == ["A red colored car, parked", "A black cat"]
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text("Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\nelement\tAbstract\tBasic\t\n")
    prompts = load_prompt_set(parti, "sd3")
    assert texts(prompts) == ["bond", "element"] and ids(prompts) == ["PartiPrompts-0", "PartiPrompts-1"]
    pick = tmp_path / "pickapic_test.csv"
    pick.write_text("image_0_uid,caption\nx,a photo of a cat\n")
    assert texts(load_prompt_set(pick, "sd3")) == ["a photo of a cat"]


def test_toy_grammar_files_get_attribute_labels(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("a small red circle in the top left\nlarge blue square bottom right\n")
    prompts = load_prompt_set(f, "toy")
    assert prompts[0].meta[ATTRS] == (0, 0, 0, 0) and prompts[1].meta[ATTRS] is not None
    free = tmp_path / "free.txt"
    free.write_text("a dog\n")
    assert load_prompt_set(free, "toy")[0].meta == {}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "", "prompt file .*empty.txt is empty"),
        ("blank.txt", "\n  \n", "prompt file .*blank.txt is empty"),
        ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', r"bad.jsonl line 2: not valid JSON"),
        ("nocol.jsonl", '{"url": "x"}\n', r"nocol.jsonl: no prompt column; found 'url', expected one of prompt"),
        ("num.jsonl", '{"prompt": 3}\n', r"num.jsonl line 1: the prompt must be a string"),
        ("bad.json", '{"a": 1}', r"bad.json: expected a list of prompts"),
        ("broken.json", '["a", ', r"broken.json: not valid JSON"),
        ("nocol.csv", "url,width\nx,3\n", r"nocol.csv: no prompt column; found 'url', 'width'"),
        ("ragged.csv", "prompt,category\na,b,c\n", r"ragged.csv row 1: 3 fields, the header has 2"),
        ("emptycell.csv", "prompt,category\n,b\n", r"emptycell.csv row 1: empty 'prompt'"),
        ("header.csv", "prompt,category\n", r"header.csv holds no prompts"),
        ("prompts.yaml", "- a\n", r"unsupported suffix '.yaml'"),
    ],
)
def test_bad_files_fail_with_one_line_naming_file_and_problem(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(CdmbenchError, match=message) as e:
        load_prompt_set(f, "sd3")
    assert "\n" not in str(e.value)


def test_binary_file_and_unknown_name(tmp_path):
    f = tmp_path / "bin.txt"
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CdmbenchError, match="bin.txt: not UTF-8 text"):
        load_prompt_set(f, "sd3")
    with pytest.raises(CdmbenchError, match=r"'parti' is neither an existing file nor a bundled set \(default, toy"):
        load_prompt_set("parti", "toy")
