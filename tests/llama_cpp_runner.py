"""llama.cpp itself, through llama-cpp-python's bindings of its C API (libllama and the multimodal
library mtmd), for the GGUF export tests: the prompt's tokens as llama.cpp splits them, the image
embeddings its mmproj computes, and greedy tokens; also what benchmarks/generate.py times. Nothing
here reads the GGUF files in Python."""
from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np
from PIL import Image

import llama_cpp as L
import llama_cpp.mtmd_cpp as M
from vistune.infer.engine import Engine, Prompt

MARKER = "<__media__>"  # mtmd's default image marker in prompt text


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level, text, user_data):  # llama.cpp logs every load at length; the tests need none of it
    return None


L.llama_log_set(_quiet, ctypes.c_void_p())
M.mtmd_log_set(_quiet, ctypes.c_void_p())
M.mtmd_helper_log_set(_quiet, ctypes.c_void_p())
L.llama_backend_init()


def llama_cpp_prompt(template_src: str, messages: list[dict], bos: str, adds_bos: bool) -> str:
    """The prompt text llama.cpp builds from the GGUF's chat template: rendered, then a leading BOS
    dropped when the vocabulary adds one itself (as llama.cpp's common/chat.cpp does)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    text = ImmutableSandboxedEnvironment().from_string(template_src).render(
        messages=messages, bos_token=bos, add_generation_prompt=True, raise_exception=raise_exception)
    return text[len(bos):] if adds_bos and bos and text.startswith(bos) else text


def messages_for(prompt: Prompt) -> list[dict]:
    """A vistune prompt (images first in the first human turn) as chat messages with llama.cpp's marker."""
    out = [] if prompt.system is None else [{"role": "system", "content": prompt.system}]
    for i, t in enumerate(prompt.turns):
        text = t["value"]
        if i == 0 and prompt.images:
            text = MARKER * len(prompt.images) + text
        out.append({"role": "user" if t["from"] == "human" else "assistant", "content": text})
    return out


class LlamaCpp:
    """One LLM GGUF (and optionally its mmproj GGUF) loaded in llama.cpp, CPU, ``threads`` threads."""

    def __init__(self, llm: Path, mmproj: Path | None = None, n_ctx: int = 1024, threads: int = 2):
        mp = L.llama_model_default_params()
        self.model = L.llama_model_load_from_file(str(llm).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {llm}")
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = n_ctx
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(self.model, cp)
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_batch = n_ctx
        self.mtmd = None
        if mmproj is not None:
            p = M.mtmd_context_params_default()
            p.use_gpu, p.print_timings, p.n_threads, p.warmup = False, False, threads, False
            self.mtmd = M.mtmd_init_from_file(str(mmproj).encode(), self.model, p)
            if not self.mtmd:
                raise RuntimeError(f"llama.cpp's mtmd could not load {mmproj}")

    def close(self) -> None:
        if self.mtmd:
            M.mtmd_free(self.mtmd)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def adds_bos(self) -> bool:
        return bool(L.llama_vocab_get_add_bos(self.vocab))

    def chat_template(self) -> str:
        return L.llama_model_chat_template(self.model, None).decode()

    # -- prompts -------------------------------------------------------------------------------
    def chunks(self, text: str, images: list[Image.Image]):
        """The prompt as mtmd's input chunks (text tokens, images preprocessed); free with free_chunks."""
        bitmaps = []
        for im in images:
            rgb = np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
            buf = (ctypes.c_ubyte * rgb.size).from_buffer_copy(rgb.tobytes())
            bitmaps.append(M.mtmd_bitmap_init(im.width, im.height, buf))
        inp = M.mtmd_input_text()
        raw = text.encode()
        inp.text, inp.text_len, inp.add_special, inp.parse_special = raw, len(raw), True, True
        chunks = M.mtmd_input_chunks_init()
        arr = (M.mtmd_bitmap_p_ctypes * max(1, len(bitmaps)))(*bitmaps)
        rc = M.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(inp), arr, len(bitmaps))
        for b in bitmaps:
            M.mtmd_bitmap_free(b)
        if rc != 0:
            M.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")
        return chunks

    def prompt_ids(self, text: str, images: list[Image.Image], image_token_id: int) -> list[int]:
        """The prompt as llama.cpp tokenizes it, each image's positions shown as ``image_token_id``."""
        if self.mtmd is None:
            return self.tokenize(text)
        chunks = self.chunks(text, images)
        ids: list[int] = []
        try:
            for i in range(M.mtmd_input_chunks_size(chunks)):
                c = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    n = ctypes.c_size_t()
                    ptr = M.mtmd_input_chunk_get_tokens_text(c, ctypes.byref(n))
                    ids += [ptr[j] for j in range(n.value)]
                else:
                    ids += [image_token_id] * M.mtmd_input_chunk_get_n_tokens(c)
        finally:
            M.mtmd_input_chunks_free(chunks)
        return ids

    @staticmethod
    def free_chunks(chunks) -> None:
        M.mtmd_input_chunks_free(chunks)

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        out = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), out, len(out), True, True)
        return list(out[:n])

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """(tokens, n_embd): what the mmproj gives for one image (the LLM's input embeddings)."""
        chunks = self.chunks(M.mtmd_default_marker().decode(), [image])
        try:
            for i in range(M.mtmd_input_chunks_size(chunks)):
                c = M.mtmd_input_chunks_get(chunks, i)
                if M.mtmd_input_chunk_get_type(c) == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    n = M.mtmd_input_chunk_get_n_tokens(c)
                    if M.mtmd_encode_chunk(self.mtmd, c) != 0:
                        raise RuntimeError("mtmd_encode_chunk failed")
                    dim = L.llama_model_n_embd_inp(self.model) if hasattr(L, "llama_model_n_embd_inp") \
                        else L.llama_model_n_embd(self.model)
                    ptr = M.mtmd_get_output_embd(self.mtmd)
                    return np.ctypeslib.as_array(ptr, shape=(n * dim,)).reshape(n, dim).copy()
        finally:
            M.mtmd_input_chunks_free(chunks)
        raise RuntimeError("no image chunk")

    # -- generation ------------------------------------------------------------------------------
    def next_logits(self, text: str, images: list[Image.Image]) -> np.ndarray:
        """The logits of the token after the prompt."""
        self._prefill(text, images)
        return np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    def greedy(self, text: str, images: list[Image.Image], n: int) -> list[int]:
        """``n`` greedy tokens after the prompt (the chat template already applied to ``text``)."""
        if self.mtmd is None:
            return self.greedy_from(self.tokenize(text), n)[0]
        chunks = self.chunks(text, images)
        try:
            return self.greedy_from(chunks, n)[0]
        finally:
            M.mtmd_input_chunks_free(chunks)

    def greedy_from(self, prompt, n: int) -> tuple[list[int], float]:
        """``n`` greedy tokens after ``prompt`` (chunks, or token ids without an mmproj), and the
        seconds from the start of the prefill (image encoding included) to the first token."""
        t0 = time.perf_counter()
        self._prefill_prepared(prompt)
        out: list[int] = []
        first = 0.0
        for i in range(n):
            if i:
                self._decode([out[-1]])
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            out.append(int(np.argmax(logits)))
            if not i:
                first = time.perf_counter() - t0
        return out, first

    def _prefill(self, text: str, images: list[Image.Image]) -> None:
        if self.mtmd is None:
            self._prefill_prepared(self.tokenize(text))
            return
        chunks = self.chunks(text, images)
        try:
            self._prefill_prepared(chunks)
        finally:
            M.mtmd_input_chunks_free(chunks)

    def _prefill_prepared(self, prompt) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        if isinstance(prompt, list):
            self._decode(prompt)
            return
        past = L.llama_pos(0)
        rc = M.mtmd_helper_eval_chunks(self.mtmd, self.ctx, prompt, 0, 0, self.n_batch, True, ctypes.byref(past))
        if rc != 0:
            raise RuntimeError(f"mtmd_helper_eval_chunks failed ({rc})")

    def _decode(self, ids: list[int]) -> None:
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")


class Pair:
    """An exported pair in llama.cpp, next to the vistune engine it came from."""

    def __init__(self, engine: Engine, files, threads: int = 2):
        self.engine = engine
        self.lc = LlamaCpp(files.llm, files.mmproj, threads=threads)
        tok = engine.tokenizer
        self.template = self.lc.chat_template()
        self.bos, self.adds_bos = tok.bos_token or "", self.lc.adds_bos()

    def text(self, prompt: Prompt) -> str:
        return llama_cpp_prompt(self.template, messages_for(prompt), self.bos, self.adds_bos)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        return self.lc.prompt_ids(self.text(prompt), list(prompt.images), self.engine.image_token_id)

    def greedy(self, prompt: Prompt, n: int) -> list[int]:
        return self.lc.greedy(self.text(prompt), list(prompt.images), n)

    def close(self):
        self.lc.close()
