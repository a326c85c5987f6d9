"""llama.cpp itself, through llama-cpp-python's bindings of its C API (libllama and the multimodal
library mtmd), for the GGUF export tests: the prompt's tokens as llama.cpp splits them, the image
embeddings its mmproj computes, and greedy tokens. Nothing here reads the GGUF files in Python."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
from PIL import Image

import llama_cpp as L
import llama_cpp.mtmd_cpp as M


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _quiet(level, text, user_data):  # llama.cpp logs every load at length; the tests need none of it
    return None


L.llama_log_set(_quiet, ctypes.c_void_p())
L.llama_backend_init()


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
    def _chunks(self, text: str, images: list[Image.Image]):
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
        chunks = self._chunks(text, images)
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

    def tokenize(self, text: str) -> list[int]:
        raw = text.encode()
        out = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(self.vocab, raw, len(raw), out, len(out), True, True)
        return list(out[:n])

    def image_embeddings(self, image: Image.Image) -> np.ndarray:
        """(tokens, n_embd): what the mmproj gives for one image (the LLM's input embeddings)."""
        chunks = self._chunks(M.mtmd_default_marker().decode(), [image])
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
        self._prefill(text, images)
        out = []
        for _ in range(n):
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            tok = int(np.argmax(logits))
            out.append(tok)
            self._decode([tok])
        return out

    def _prefill(self, text: str, images: list[Image.Image]) -> None:
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        if self.mtmd is not None:
            chunks = self._chunks(text, images)
            past = L.llama_pos(0)
            try:
                rc = M.mtmd_helper_eval_chunks(self.mtmd, self.ctx, chunks, 0, 0, self.n_batch, True,
                                               ctypes.byref(past))
            finally:
                M.mtmd_input_chunks_free(chunks)
            if rc != 0:
                raise RuntimeError(f"mtmd_helper_eval_chunks failed ({rc})")
        else:
            self._decode(self.tokenize(text))

    def _decode(self, ids: list[int]) -> None:
        arr = (L.llama_token * len(ids))(*ids)
        if L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(ids))) != 0:
            raise RuntimeError("llama_decode failed")
