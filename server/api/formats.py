"""The OpenAI response shapes: whole responses and server-sent-event chunks.

`run` is the request being answered (server/api/routers/completions.py `_Run`): its `id`,
`created`, `model_name`, whether the stream carries usage, and, for log-probabilities, how
token ids read as text (`run.token_texts`) and each choice's text offset so far.

Log-probabilities (`entries`: server.engine.request.TokenLogprob, one per token) take the two
OpenAI shapes: the completions API's `{"tokens", "token_logprobs", "top_logprobs",
"text_offset"}` (top_logprobs a dict token -> logprob per position; `null` for the prompt's
first token, which nothing predicts) and the chat API's `{"content": [{"token", "logprob",
"bytes", "top_logprobs": [...]}], "refusal": null}`. A token's text is its own decoding
(`tokenizer.decode([id])`): a token holding part of a UTF-8 character reads as U+FFFD, as in vLLM.
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

    def chunks(self, run, index: int, text: str, finish_reason: str | None, entries: list | None = None) -> list[dict]:
        raise NotImplementedError

    def response(self, run, results: list[tuple]) -> dict:
        """`results`: per choice (text, finish_reason, log-probability entries or None)."""
        raise NotImplementedError

    def logprobs(self, run, index: int, entries: list | None) -> dict | None:
        """The choice's `logprobs` object for these entries; None (JSON null) without entries."""
        raise NotImplementedError


class TextCompletionFormat(ResponseFormat):
    id_prefix, object_name, chunk_object = "cmpl", "text_completion", "text_completion"

    def chunks(self, run, index, text, finish_reason, entries=None):
        if not text and finish_reason is None and not entries:
            return []
        choice = {"index": index, "text": text, "logprobs": self.logprobs(run, index, entries),
                  "finish_reason": finish_reason}
        return [{**self.chunk_head(run), "choices": [choice]}]

    def response(self, run, results):
        return {"id": run.id, "object": self.object_name, "created": run.created, "model": run.model_name,
                "choices": [{"index": i, "text": text, "logprobs": self.logprobs(run, i, entries),
                             "finish_reason": reason} for i, (text, reason, entries) in enumerate(results)]}

    def logprobs(self, run, index, entries):
        if entries is None:
            return None
        tokens = run.token_texts([e.token_id for e in entries])
        offsets, offset = [], run.text_offsets[index]
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        run.text_offsets[index] = offset
        top = []
        for e in entries:
            if e.logprob is None:
                top.append(None)
                continue
            names = run.token_texts([t for t, _ in e.top])
            top.append({name: value for name, (_, value) in zip(names, e.top)})
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": top,
                "text_offset": offsets}


class ChatFormat(ResponseFormat):
    id_prefix, object_name, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def opening_chunks(self, run, index):
        choice = {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}
        return [{**self.chunk_head(run), "choices": [choice]}]

    def chunks(self, run, index, text, finish_reason, entries=None):
        out = []
        if text or entries:
            choice = {"index": index, "delta": {"content": text}, "logprobs": self.logprobs(run, index, entries),
                      "finish_reason": None}
            out.append({**self.chunk_head(run), "choices": [choice]})
        if finish_reason is not None:
            choice = {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
            out.append({**self.chunk_head(run), "choices": [choice]})
        return out

    def response(self, run, results):
        return {"id": run.id, "object": self.object_name, "created": run.created, "model": run.model_name,
                "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                             "logprobs": self.logprobs(run, i, entries), "finish_reason": reason}
                            for i, (text, reason, entries) in enumerate(results)]}

    def logprobs(self, run, index, entries):
        if entries is None:
            return None
        content = []
        for e in entries:
            names = run.token_texts([e.token_id] + [t for t, _ in e.top])
            content.append({"token": names[0], "logprob": e.logprob, "bytes": list(names[0].encode()),
                            "top_logprobs": [{"token": name, "logprob": value, "bytes": list(name.encode())}
                                             for name, (_, value) in zip(names[1:], e.top)]})
        return {"content": content, "refusal": None}
