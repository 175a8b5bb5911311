"""The OpenAI response shapes: whole responses and server-sent-event chunks.

`run` is the request being answered (server/api/routers/completions.py `_Run`): its `id`,
`created`, `model_name` and whether the stream carries usage.
"""

from __future__ import annotations


class ResponseFormat:
    id_prefix = ""
    object_name = ""
    chunk_object = ""

    def chunk_head(self, run) -> dict:
        head = {"id": run.id, "object": self.chunk_object, "created": run.created, "model": run.model_name}
        if run.usage_in_stream:
            head["usage"] = None
        return head

    def opening_chunks(self, run, index: int) -> list[dict]:
        return []

    def chunks(self, run, index: int, text: str, finish_reason: str | None) -> list[dict]:
        raise NotImplementedError

    def response(self, run, results: list[tuple[str, str]]) -> dict:
        raise NotImplementedError


class TextCompletionFormat(ResponseFormat):
    id_prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def chunks(self, run, index, text, finish_reason):
        if not text and finish_reason is None:
            return []
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return [{**self.chunk_head(run), "choices": [choice]}]

    def response(self, run, results):
        return {"id": run.id, "object": self.object_name, "created": run.created, "model": run.model_name,
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                            for i, (text, reason) in enumerate(results)]}


class ChatFormat(ResponseFormat):
    id_prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening_chunks(self, run, index):
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return [{**self.chunk_head(run), "choices": [choice]}]

    def chunks(self, run, index, text, finish_reason):
        out = []
        if text:
            choice = {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}
            out.append({**self.chunk_head(run), "choices": [choice]})
        if finish_reason is not None:
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
            out.append({**self.chunk_head(run), "choices": [choice]})
        return out

    def response(self, run, results):
        return {"id": run.id, "object": self.object_name, "created": run.created, "model": run.model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason} for i, (text, reason) in enumerate(results)]}
