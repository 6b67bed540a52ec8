"""Image tokens in the providers' usage, and an image edit's multipart form read for its model."""

from __future__ import annotations

from llmtally.providers.gemini import usage_from_gemini
from llmtally.providers.openai import form_fields, usage_from_openai
from llmtally.record import TokenUsage


def test_openai_image_tokens_in_each_usage_shape() -> None:
    chat = {"prompt_tokens": 900, "completion_tokens": 10, "prompt_tokens_details": {"image_tokens": 765}}
    assert usage_from_openai(chat) == TokenUsage(900, 10, input_image_tokens=765)
    images_1 = {
        "input_tokens": 50,
        "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
        "output_tokens": 4160,
    }
    # gpt-image-1 splits no output: every output token of the Images API is an image token...
    assert usage_from_openai(images_1, images=True) == TokenUsage(
        50, 4160, input_image_tokens=40, output_image_tokens=4160
    )
    # ...unless it says otherwise (gpt-image-1.5), and outside the Images API nothing is assumed.
    split = {**images_1, "output_tokens_details": {"image_tokens": 4000, "text_tokens": 160}}
    assert usage_from_openai(split, images=True) == TokenUsage(
        50, 4160, input_image_tokens=40, output_image_tokens=4000
    )
    assert usage_from_openai(images_1) == TokenUsage(50, 4160, input_image_tokens=40)


def test_gemini_image_and_document_modalities_are_image_tokens() -> None:
    meta = {
        "promptTokenCount": 1000, "candidatesTokenCount": 1300,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 484}, {"modality": "IMAGE", "tokenCount": 258},
            {"modality": "DOCUMENT", "tokenCount": 258},
        ],
        "candidatesTokensDetails": [{"modality": "TEXT", "tokenCount": 10}, {"modality": "IMAGE", "tokenCount": 1290}],
    }  # fmt: skip
    usage = usage_from_gemini(meta)
    assert usage is not None
    assert (usage.input_image_tokens, usage.output_image_tokens) == (516, 1290)
    assert usage_from_gemini(meta, embedding=True) == TokenUsage(1000, 0, input_image_tokens=516)


def test_form_fields_reads_text_parts_and_skips_files() -> None:
    b = b"--xyz"
    body = (
        b + b'\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        b'\x89PNG name="model"\r\n\r\nfake' + b"\r\n"
        + b + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1\r\n'
        + b + b'\r\nContent-Disposition: form-data; name="stream"\r\n\r\ntrue\r\n'
        + b + b"--\r\n"
    )  # fmt: skip
    assert form_fields(body, ("model", "stream")) == {"model": "gpt-image-1", "stream": "true"}
    assert form_fields(body, ("prompt",)) == {}
    assert form_fields(b"not a form", ("model",)) == {}
    assert form_fields(b"", ("model",)) == {}
