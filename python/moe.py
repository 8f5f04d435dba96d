"""moe.py - Python binding of moe (moe.h) through ctypes. One file, standard library only.

    import moe
    model = moe.Model("model.gguf", backend=moe.BACKEND_CPU)
    ctx = moe.Context(model)
    ctx.step([9707, 11, 1879])                  # prefill
    sampler = moe.Sampler(temperature=0.7, top_p=0.9, seed=1)
    for _ in range(16):
        t = sampler.sample(ctx.logits())        # or choose from ctx.logits() yourself
        ctx.step([t])

The shared library is build/libmoe.so next to this directory (`make` builds it), or the path in
the MOE_LIB environment variable. Every failing call raises MoeError(status, message), where
message is moe_last_error() of the calling thread. The ctypes calls release the GIL, so several
contexts of one model can run in parallel threads (one thread per context at a time).

Lifetimes: a Context keeps its Model alive, in C as in Python (moe.h: the model is reference
counted), so `with Model(...) as m: ctx = Context(m)` leaves ctx usable after the block.
close() (or a `with` block) releases the C object at once (a Model's memory goes when its last
Context is closed too), otherwise it is released when the Python object is collected. The array that
Context.logits() returns is a view of the context's memory, valid until the next call on that
context; copy it (list(view)) to keep it.

The classes mirror moe.h one to one; the raw functions are in `lib` with their argtypes set, and
the structs (LoadParams, ModelInfo, CtxParams, SamplerParams, SaveParams, Stats) follow moe.h
field by field (test/test_python.sh checks their sizes and offsets against the C compiler's).
"""

import ctypes
import os
import sys
from ctypes import (CFUNCTYPE, POINTER, Structure, byref, c_char, c_char_p, c_double, c_float, c_int32,
                    c_size_t, c_uint32, c_uint64, c_void_p)

__all__ = ["MoeError", "Model", "Context", "Sampler", "SamplerChain", "version", "status_str", "last_error", "lib"]

# ---- constants (moe.h) -----------------------------------------------------------------------
OK = 0
ERR_INVALID_ARG = -1
ERR_IO = -2
ERR_FORMAT = -3
ERR_UNSUPPORTED = -4
ERR_NO_MEMORY = -5
ERR_DEVICE = -6
ERR_CONTEXT_FULL = -7
ERR_BUFFER_TOO_SMALL = -8
ERR_CANCELLED = -9
ERR_TIMEOUT = -10  # moe_step_wait: the step still runs
ERR_BUSY = -11     # a step is in flight on the context

BACKEND_AUTO, BACKEND_CPU, BACKEND_VULKAN = 0, 1, 2
KV_F16, KV_F32, KV_Q8_0 = 0, 1, 2
TOKENIZE_ADD_SPECIAL, TOKENIZE_PARSE_SPECIAL = 1, 2
LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG = 0, 1, 2, 3
FTYPE_KEEP, FTYPE_F32, FTYPE_F16, FTYPE_BF16, FTYPE_Q8_0 = 0, 1, 2, 3, 4
FTYPE_Q4_K, FTYPE_Q5_K, FTYPE_Q6_K, FTYPE_Q4_0 = 5, 6, 7, 8

# ---- structs (field for field as in moe.h) -----------------------------------------------------
PROGRESS_FN = CFUNCTYPE(c_int32, c_float, c_void_p)
LOG_FN = CFUNCTYPE(None, c_int32, c_char_p, c_void_p)
ABORT_FN = CFUNCTYPE(c_int32, c_void_p)


class LoadParams(Structure):
    _fields_ = [("backend", c_int32), ("device_index", c_int32), ("n_threads", c_int32), ("reserved0", c_int32),
                ("gpu_budget_bytes", c_uint64), ("host_budget_bytes", c_uint64),
                ("progress", PROGRESS_FN), ("log", LOG_FN), ("user", c_void_p), ("vocab_only", c_int32),
                ("cpu_exact", c_int32), ("gpu_exact", c_int32),
                ("vk", c_void_p), ("vk_pipeline_cache_path", c_char_p), ("vk_pipeline_cache_data", c_void_p),
                ("vk_pipeline_cache_size", c_size_t)]


class ModelInfo(Structure):
    _fields_ = [("arch", c_char * 32), ("n_vocab", c_int32), ("n_layer", c_int32), ("n_embd", c_int32),
                ("n_ctx_train", c_int32), ("n_expert", c_int32), ("n_expert_used", c_int32),
                ("bos", c_int32), ("eos", c_int32), ("n_params", c_uint64), ("file_bytes", c_uint64),
                ("backend", c_int32), ("weight_bytes", c_uint64), ("expert_bytes", c_uint64)]


class CtxParams(Structure):
    _fields_ = [("n_ctx", c_int32), ("kv_type", c_int32), ("logits_all", c_int32), ("n_batch", c_int32),
                ("abort", ABORT_FN), ("abort_user", c_void_p), ("max_submit_us", c_uint32), ("low_priority", c_int32)]


class SamplerParams(Structure):
    _fields_ = [("temperature", c_float), ("top_k", c_int32), ("top_p", c_float), ("min_p", c_float),
                ("repeat_penalty", c_float), ("repeat_last_n", c_int32), ("presence_penalty", c_float),
                ("frequency_penalty", c_float), ("seed", c_uint64)]


class SaveParams(Structure):
    _fields_ = [("ftype", c_int32), ("reserved0", c_int32), ("progress", PROGRESS_FN), ("user", c_void_p)]


class Stats(Structure):
    _fields_ = [("gpu_bytes_weights", c_uint64), ("gpu_bytes_kv", c_uint64), ("gpu_bytes_scratch", c_uint64),
                ("host_bytes", c_uint64), ("expert_hits", c_uint64), ("expert_misses", c_uint64),
                ("expert_bytes_streamed", c_uint64), ("n_prompt_tokens", c_uint64), ("n_gen_tokens", c_uint64),
                ("t_prompt_s", c_double), ("t_gen_s", c_double), ("t_load_s", c_double)]


def _struct_dict(s):
    d = {}
    for name, _ in s._fields_:
        v = getattr(s, name)
        d[name] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return d


# ---- the library ---------------------------------------------------------------------------------
def _load_library():
    here = os.path.dirname(os.path.abspath(__file__))
    name = "moe.dll" if sys.platform == "win32" else "libmoe.dylib" if sys.platform == "darwin" else "libmoe.so"
    # MOE_LIB, then the library that `pip install ./python` put beside this file, then the
    # repository's build/ (the single-file use), then this folder
    candidates = [os.environ.get("MOE_LIB"), os.path.join(here, "moe.libs", name), os.path.join(here, "..", "build", name),
                  os.path.join(here, name)]
    errors = []
    for path in candidates:
        if path and os.path.exists(path):
            try:
                return ctypes.CDLL(os.path.abspath(path))
            except OSError as e:
                errors.append(str(e))
    raise OSError("moe: cannot find " + name + " (run `make` or `pip install ./python`, or set MOE_LIB): " + "; ".join(errors or [str(candidates)]))


# The MOE_ABI_VERSION (moe.h) whose structs and signatures this file declares. A library of another
# ABI version is refused at import, and each struct's size is checked against the library's, so
# the binding never passes a struct of the wrong size.
ABI_VERSION = 3
lib = _load_library()


def _check_abi():
    try:
        f = lib.moe_abi_version
    except AttributeError:
        raise OSError("moe: %s has no moe_abi_version(): a library older than this binding (ABI %d)" % (lib._name, ABI_VERSION))
    f.restype, f.argtypes = c_int32, []
    if f() != ABI_VERSION:
        raise OSError("moe: %s has ABI version %d, this binding (python/moe.py) is written for %d: use the moe.py that came "
                      "with the library" % (lib._name, f(), ABI_VERSION))
    lib.moe_struct_size.restype, lib.moe_struct_size.argtypes = c_size_t, [c_int32]
    for which, cls in ((1, LoadParams), (2, ModelInfo), (3, CtxParams), (4, SamplerParams), (5, SaveParams), (6, Stats)):
        if lib.moe_struct_size(which) != ctypes.sizeof(cls):
            raise OSError("moe: %s is %d bytes in the library, %d in python/moe.py" % (cls.__name__, lib.moe_struct_size(which),
                                                                                     ctypes.sizeof(cls)))


_check_abi()
_model_p = c_void_p
_ctx_p = c_void_p
_sampler_p = c_void_p
_SIGNATURES = {
    "moe_version": (c_char_p, []),
    "moe_abi_version": (c_int32, []),
    "moe_struct_size": (c_size_t, [c_int32]),
    "moe_status_str": (c_char_p, [c_int32]),
    "moe_last_error": (c_char_p, []),
    "moe_load": (c_int32, [c_char_p, POINTER(LoadParams), POINTER(_model_p)]),
    "moe_model_free": (None, [_model_p]),
    "moe_model_get_info": (c_int32, [_model_p, POINTER(ModelInfo)]),
    "moe_tokenize": (c_int32, [_model_p, c_char_p, c_int32, POINTER(c_int32), c_int32, c_int32, POINTER(c_int32)]),
    "moe_token_to_piece": (c_int32, [_model_p, c_int32, POINTER(c_char), c_int32, POINTER(c_int32)]),
    "moe_detokenize": (c_int32, [_model_p, POINTER(c_int32), c_int32, POINTER(c_char), c_int32, c_int32,
                                 POINTER(c_int32)]),
    "moe_token_is_eog": (c_int32, [_model_p, c_int32]),
    "moe_chat_apply": (c_int32, [_model_p, POINTER(c_char_p), POINTER(c_char_p), c_int32, c_int32,
                                 POINTER(c_char), c_int32, POINTER(c_int32)]),
    "moe_ctx_new": (c_int32, [_model_p, POINTER(CtxParams), POINTER(_ctx_p)]),
    "moe_ctx_free": (None, [_ctx_p]),
    "moe_step": (c_int32, [_ctx_p, POINTER(c_int32), c_int32]),
    "moe_step_submit": (c_int32, [_ctx_p, POINTER(c_int32), c_int32]),
    "moe_step_wait": (c_int32, [_ctx_p, c_uint64]),
    "moe_ctx_submit_times": (c_int32, [_ctx_p, POINTER(c_uint64), POINTER(c_double), POINTER(c_double), c_int32]),
    "moe_logits": (POINTER(c_float), [_ctx_p, c_int32]),
    "moe_ctx_pos": (c_int32, [_ctx_p]),
    "moe_ctx_rewind": (c_int32, [_ctx_p, c_int32]),
    "moe_ctx_save": (c_int32, [_ctx_p, c_void_p, c_size_t, POINTER(c_size_t)]),
    "moe_ctx_load": (c_int32, [_ctx_p, c_void_p, c_size_t]),
    "moe_sampler_new": (c_int32, [POINTER(SamplerParams), POINTER(_sampler_p)]),
    "moe_sampler_free": (None, [_sampler_p]),
    "moe_sample": (c_int32, [_sampler_p, POINTER(c_float), c_int32]),
    "moe_sampler_accept": (None, [_sampler_p, c_int32]),
    "moe_sampler_reset": (None, [_sampler_p]),
    "moe_model_save": (c_int32, [_model_p, c_char_p, POINTER(SaveParams)]),
    "moe_ctx_get_stats": (c_int32, [_ctx_p, POINTER(Stats)]),
}
for _name, (_res, _args) in _SIGNATURES.items():
    _f = getattr(lib, _name)
    _f.restype = _res
    _f.argtypes = _args


def version():
    return lib.moe_version().decode()


def status_str(status):
    return lib.moe_status_str(status).decode()


def last_error():
    return (lib.moe_last_error() or b"").decode("utf-8", "replace")


class MoeError(Exception):
    """A failed moe call: .status is the moe_status (negative), .message moe_last_error()."""

    def __init__(self, status, message=None):
        self.status = status
        self.message = last_error() if message is None else message
        super().__init__("%s (%d): %s" % (status_str(status), status, self.message))


def _check(status):
    if status != OK:
        raise MoeError(status)
    return status


def _fill(call, cap, make_buf):
    """Runs call(buf, cap, n_out) for moe's fill-a-buffer functions: OK with the count written in
    n_out, or ERR_BUFFER_TOO_SMALL with the count needed (then once more with that capacity, plus
    one byte for moe_chat_apply's NUL); any other status raises MoeError. Returns (buf, n)."""
    n = c_int32(0)
    while True:
        buf = make_buf(cap)
        st = call(buf, cap, byref(n))
        if st == OK:
            return buf, n.value
        if st != ERR_BUFFER_TOO_SMALL or n.value <= cap:
            raise MoeError(st)
        cap = n.value + 1


def _bytes(s):
    return s.encode("utf-8") if isinstance(s, str) else bytes(s)


def _float_array(logits, n_vocab):
    """A POINTER(c_float) and n_vocab for ctypes float arrays (views) or any sequence of numbers."""
    if isinstance(logits, ctypes.Array) and logits._type_ is c_float:
        n = len(logits) if n_vocab is None else n_vocab
        if n > len(logits):
            raise MoeError(ERR_INVALID_ARG, "n_vocab %d exceeds the %d logits given" % (n, len(logits)))
        return ctypes.cast(logits, POINTER(c_float)), n
    values = list(logits)
    n = len(values) if n_vocab is None else n_vocab
    if n > len(values):
        raise MoeError(ERR_INVALID_ARG, "n_vocab %d exceeds the %d logits given" % (n, len(values)))
    return (c_float * len(values))(*values), n


class _Handle(object):
    _free = None

    def close(self):
        h, self._h = getattr(self, "_h", None), None
        if h:
            type(self)._free(h)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _handle(self):
        if not self._h:
            raise MoeError(ERR_INVALID_ARG, "%s is closed" % type(self).__name__)
        return self._h


# ---- model -----------------------------------------------------------------------------------
class Model(_Handle):
    """moe_load: a .gguf file or a Hugging Face model directory.

    progress(fraction) -> truthy cancels the load (MoeError ERR_CANCELLED); log(level, message)."""
    _free = staticmethod(lib.moe_model_free)

    def __init__(self, path, backend=BACKEND_AUTO, device_index=0, n_threads=0, gpu_budget_bytes=0,
                 host_budget_bytes=0, progress=None, log=None):
        self._h = None
        p = LoadParams(backend=backend, device_index=device_index, n_threads=n_threads,
                       gpu_budget_bytes=gpu_budget_bytes, host_budget_bytes=host_budget_bytes)
        errors = []   # an exception inside a callback is re-raised after the call

        def on_progress(fraction, user):
            try:
                return 1 if progress(fraction) else 0
            except BaseException as e:
                errors.append(e)
                return 1

        def on_log(level, msg, user):
            try:
                log(level, msg.decode("utf-8", "replace"))
            except BaseException as e:
                errors.append(e)

        cb_progress = PROGRESS_FN(on_progress) if progress else PROGRESS_FN()
        cb_log = LOG_FN(on_log) if log else LOG_FN()
        p.progress, p.log = cb_progress, cb_log
        h = _model_p()
        st = lib.moe_load(_bytes(os.fspath(path)), byref(p), byref(h))
        if errors:
            if h:
                lib.moe_model_free(h)
            raise errors[0]
        _check(st)
        self._h = h
        self._log_cb = cb_log   # the model may log later (from any of its calls): keep it alive
        self.info = self.get_info()
        self.n_vocab = self.info["n_vocab"]

    def get_info(self):
        info = ModelInfo()
        _check(lib.moe_model_get_info(self._handle(), byref(info)))
        return _struct_dict(info)

    # tokenizer
    def tokenize(self, text, add_special=False, parse_special=False):
        """text (str or bytes) -> list of token ids."""
        data = _bytes(text)
        flags = (TOKENIZE_ADD_SPECIAL if add_special else 0) | (TOKENIZE_PARSE_SPECIAL if parse_special else 0)
        h = self._handle()
        buf, n = _fill(lambda b, cap, n: lib.moe_tokenize(h, data, len(data), b, cap, flags, n),
                       max(16, len(data) + 8), lambda cap: (c_int32 * cap)())
        return list(buf[:n])

    def token_to_piece(self, token):
        """The raw bytes of one token (may be part of a UTF-8 sequence)."""
        h = self._handle()
        buf, n = _fill(lambda b, cap, n: lib.moe_token_to_piece(h, token, b, cap, n), 64,
                       ctypes.create_string_buffer)
        return buf.raw[:n]

    def detokenize(self, tokens, parse_special=False, raw=False):
        """tokens -> str (invalid UTF-8 replaced), or bytes with raw=True."""
        toks = (c_int32 * max(1, len(tokens)))(*tokens)
        flags = TOKENIZE_PARSE_SPECIAL if parse_special else 0
        h = self._handle()
        buf, n = _fill(lambda b, cap, n: lib.moe_detokenize(h, toks, len(tokens), b, cap, flags, n),
                       16 * len(tokens) + 16, ctypes.create_string_buffer)
        data = buf.raw[:n]
        return data if raw else data.decode("utf-8", "replace")

    def is_eog(self, token):
        return bool(lib.moe_token_is_eog(self._handle(), token))

    def chat_apply(self, messages, add_assistant_prompt=True):
        """messages: [(role, content), ...] or [{"role": ..., "content": ...}, ...] -> the prompt text."""
        pairs = [(m["role"], m["content"]) if isinstance(m, dict) else m for m in messages]
        roles = (c_char_p * max(1, len(pairs)))(*[_bytes(r) for r, _ in pairs])
        contents = (c_char_p * max(1, len(pairs)))(*[_bytes(c) for _, c in pairs])
        h = self._handle()
        buf, n = _fill(lambda b, cap, n: lib.moe_chat_apply(h, roles, contents, len(pairs), 1 if add_assistant_prompt else 0,
                                                            b, cap, n),
                       4096, ctypes.create_string_buffer)
        return buf.raw[:n].decode("utf-8", "replace")

    def save(self, path, ftype=FTYPE_KEEP, progress=None):
        """moe_model_save: writes the model as GGUF (re-quantized to ftype)."""
        errors = []

        def on_progress(fraction, user):
            try:
                return 1 if progress(fraction) else 0
            except BaseException as e:
                errors.append(e)
                return 1

        p = SaveParams(ftype=ftype)
        p.progress = PROGRESS_FN(on_progress) if progress else PROGRESS_FN()
        st = lib.moe_model_save(self._handle(), _bytes(os.fspath(path)), byref(p))
        if errors:
            raise errors[0]
        _check(st)


# ---- context -----------------------------------------------------------------------------------
class Context(_Handle):
    """moe_ctx_new: one sequence (KV cache, position, logits). Keeps its model alive."""
    _free = staticmethod(lib.moe_ctx_free)

    def __init__(self, model, n_ctx=0, kv_type=KV_F16, logits_all=False, n_batch=0, abort=None, max_submit_us=0,
                 low_priority=False):
        """abort: a callable polled between chunks and layers of a step (from the step's thread, the
        worker's for submit/wait); truthy stops the step with MoeError ERR_CANCELLED and leaves the
        context as before it. max_submit_us, low_priority: see moe_ctx_params in moe.h."""
        self._h = None
        # the callback must outlive the context: kept on self
        self._abort = ABORT_FN(lambda user: 1 if abort() else 0) if abort else ABORT_FN()
        p = CtxParams(n_ctx=n_ctx, kv_type=kv_type, logits_all=1 if logits_all else 0, n_batch=n_batch,
                      abort=self._abort, max_submit_us=max_submit_us, low_priority=1 if low_priority else 0)
        h = _ctx_p()
        _check(lib.moe_ctx_new(model._handle(), byref(p), byref(h)))
        self._h = h
        self.model = model
        self.n_vocab = model.n_vocab
        self._n_last = 0

    def generate(self, prompt, max_tokens=128, sampler=None, stop=(), add_special=True):
        """Streams the continuation of prompt (text, or token ids; may be empty to continue from
        the context as it is) as str pieces, yielded as soon as they are whole UTF-8 characters.
        sampler: a Sampler or SamplerChain (default greedy). Stops at an end-of-generation token,
        at a stop string (not yielded; text that might begin one is held back until it can't), at
        max_tokens, or when the context is full. Afterwards self.finish_reason is "stop" or
        "length" and self.generated lists the tokens (the stop token excluded)."""
        self.generated = []
        return _generate(self, prompt, max_tokens, sampler, stop, add_special, self.generated)

    def step(self, tokens):
        """Feeds tokens (a prompt chunk or one sampled token) at the current position."""
        tokens = list(tokens)
        arr = (c_int32 * max(1, len(tokens)))(*tokens)
        _check(lib.moe_step(self._handle(), arr, len(tokens)))
        self._n_last = len(tokens)

    def submit(self, tokens):
        """moe_step_submit: starts the step on the context's worker and returns at once; until wait()
        returns True only wait() (and close) may be called."""
        tokens = list(tokens)
        arr = (c_int32 * max(1, len(tokens)))(*tokens)
        _check(lib.moe_step_submit(self._handle(), arr, len(tokens)))
        self._n_last = len(tokens)

    def wait(self, timeout=None):
        """moe_step_wait: True when the submitted step is done (logits readable), False while it still
        runs after timeout seconds (0 polls; None waits for good); a failed step raises MoeError."""
        ns = 0xFFFFFFFFFFFFFFFF if timeout is None else max(0, int(timeout * 1e9))
        st = lib.moe_step_wait(self._handle(), ns)
        if st == ERR_TIMEOUT:
            return False
        _check(st)
        return True

    def submit_times(self, reset=False):
        """GPU time of this context's queue submissions (Vulkan): (count, longest us, total us)."""
        n, mx, tot = c_uint64(0), c_double(0), c_double(0)
        _check(lib.moe_ctx_submit_times(self._handle(), byref(n), byref(mx), byref(tot), 1 if reset else 0))
        return n.value, mx.value, tot.value

    def logits(self, i=-1):
        """The next-token logits as a ctypes (c_float * n_vocab) view, valid until the next call on
        this context. i = -1: after the last token of the last step; i >= 0 needs logits_all."""
        p = lib.moe_logits(self._handle(), i)
        if not p:
            raise MoeError(ERR_INVALID_ARG, "no logits for index %d (step first; i >= 0 needs logits_all)" % i)
        return ctypes.cast(p, POINTER(c_float * self.n_vocab)).contents

    @property
    def pos(self):
        return lib.moe_ctx_pos(self._handle())

    def rewind(self, pos):
        _check(lib.moe_ctx_rewind(self._handle(), pos))

    def save(self):
        """Snapshot of the context as bytes (prompt caching)."""
        h = self._handle()
        size = c_size_t(0)
        _check(lib.moe_ctx_save(h, None, 0, byref(size)))
        buf = ctypes.create_string_buffer(max(1, size.value))
        _check(lib.moe_ctx_save(h, buf, size.value, byref(size)))
        return buf.raw[:size.value]

    def load(self, data):
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        _check(lib.moe_ctx_load(self._handle(), buf, len(data)))

    def stats(self):
        s = Stats()
        _check(lib.moe_ctx_get_stats(self._handle(), byref(s)))
        return _struct_dict(s)


# ---- sampler ------------------------------------------------------------------------------------
class Sampler(_Handle):
    """moe_sampler_new: penalties -> top-k -> temperature -> top-p -> min-p -> draw (see moe.h).
    All defaults zero = greedy."""
    _free = staticmethod(lib.moe_sampler_free)

    def __init__(self, temperature=0.0, top_k=0, top_p=0.0, min_p=0.0, repeat_penalty=0.0, repeat_last_n=0,
                 presence_penalty=0.0, frequency_penalty=0.0, seed=0):
        self._h = None
        p = SamplerParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                          presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                          seed=seed & 0xFFFFFFFFFFFFFFFF)
        h = _sampler_p()
        _check(lib.moe_sampler_new(byref(p), byref(h)))
        self._h = h

    def sample(self, logits, n_vocab=None):
        """Picks a token from logits (Context.logits()'s view, or any sequence of floats) and records it."""
        ptr, n = _float_array(logits, n_vocab)
        t = lib.moe_sample(self._handle(), ptr, n)
        if t < 0:   # moe_sample returns -1; the message says why
            msg = last_error()
            raise MoeError(ERR_NO_MEMORY if "out of memory" in msg else ERR_INVALID_ARG, msg)
        return t

    def accept(self, token):
        """Records a token chosen by the caller (for the penalties)."""
        lib.moe_sampler_accept(self._handle(), token)

    def reset(self):
        """Forgets the history and re-seeds: as new."""
        lib.moe_sampler_reset(self._handle())


# ---- sampler chain ---------------------------------------------------------------------------------
class SamplerChain(object):
    """A sampler built stage by stage, as llama.cpp's llama_sampler_chain (and llama-cpp-python's
    LlamaSampler) users write it:

        chain = moe.SamplerChain().add_penalties(64, 1.1).add_top_k(40).add_temp(0.8).add_top_p(0.95).add_dist(seed=7)
        token = chain.sample(ctx.logits())

    The built-in stages run in C (moe_sample) in moe's fixed order: penalties -> top_k -> temp ->
    top_p -> min_p -> dist (or greedy). Adding a stage out of that order raises ValueError instead
    of silently reordering it (top_p before temp would mean something else). add_custom(fn) stages
    run first, in Python: fn(logits, history) gets a (c_float * n_vocab) copy of the logits and the
    tokens accepted so far, and may change the array in place or return a new sequence of floats
    (a grammar mask, a logit bias, a ban list)."""

    _ORDER = ("penalties", "top_k", "temp", "top_p", "min_p", "dist")

    def __init__(self):
        self._params = {}
        self._stages = []
        self._custom = []
        self._history = []
        self._sampler = None

    def _add(self, stage, **params):
        if self._sampler is not None:
            raise ValueError("SamplerChain: stages are added before the first sample()")
        if stage in self._stages:
            raise ValueError("SamplerChain: %s added twice" % stage)
        if self._stages and self._ORDER.index(stage) < self._ORDER.index(self._stages[-1]):
            raise ValueError("SamplerChain: %s after %s; moe samples in the order %s" % (stage, self._stages[-1], " -> ".join(self._ORDER)))
        self._stages.append(stage)
        self._params.update(params)
        return self

    def add_penalties(self, last_n=64, repeat=1.0, frequency=0.0, presence=0.0):
        return self._add("penalties", repeat_last_n=last_n, repeat_penalty=repeat, frequency_penalty=frequency,
                         presence_penalty=presence)

    def add_top_k(self, k):
        return self._add("top_k", top_k=k)

    def add_temp(self, t):
        return self._add("temp", temperature=t)

    def add_top_p(self, p, min_keep=1):
        return self._add("top_p", top_p=p)

    def add_min_p(self, p, min_keep=1):
        return self._add("min_p", min_p=p)

    def add_dist(self, seed=0):
        return self._add("dist", seed=seed)

    def add_greedy(self):
        if "temp" in self._stages:
            raise ValueError("SamplerChain: greedy after temp (greedy ignores the temperature)")
        return self._add("dist", temperature=0.0)

    def add_custom(self, fn):
        if self._sampler is not None:
            raise ValueError("SamplerChain: stages are added before the first sample()")
        self._custom.append(fn)
        return self

    def _get(self):
        if self._sampler is None:
            p = dict(self._params)
            if "dist" not in self._stages or "temp" not in self._stages:
                p["temperature"] = 0.0      # no draw stage, or no temperature: greedy, as llama.cpp's chain ends
            self._sampler = Sampler(**p)
        return self._sampler

    def sample(self, logits, n_vocab=None):
        """Runs the custom stages, then the built-in ones; records the token (penalties, history)."""
        s = self._get()
        if self._custom:
            n = len(logits) if n_vocab is None else n_vocab
            arr = (c_float * n)()
            ctypes.memmove(arr, ctypes.addressof(logits), n * 4) if isinstance(logits, ctypes.Array) else arr.__setitem__(slice(0, n), list(logits)[:n])
            for fn in self._custom:
                out = fn(arr, self._history)
                if out is not None and out is not arr:
                    arr = (c_float * n)(*list(out)[:n])
            logits = arr
        t = s.sample(logits, n_vocab)
        self._history.append(t)
        return t

    def accept(self, token):
        self._get().accept(token)
        self._history.append(token)

    def reset(self):
        if self._sampler is not None:
            self._sampler.reset()
        self._history = []

    def close(self):
        if self._sampler is not None:
            self._sampler.close()


# ---- streaming generation -----------------------------------------------------------------------
def _generate(ctx, prompt, max_tokens, sampler, stop, add_special, tokens_out):
    import codecs
    model = ctx.model
    if isinstance(prompt, (str, bytes)):
        ids = model.tokenize(prompt, add_special=add_special, parse_special=True)
    else:
        ids = list(prompt)
    sampler = sampler if sampler is not None else Sampler()
    stops = [st for st in (stop or ()) if st]
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    ctx.finish_reason = None
    if ids:
        ctx.step(ids)       # a prompt that does not fit raises MoeError(ERR_CONTEXT_FULL)
    pending = ""     # text held back while it may be the start of a stop string
    for _ in range(max_tokens):
        t = sampler.sample(ctx.logits())
        if model.is_eog(t):
            ctx.finish_reason = "stop"
            break
        tokens_out.append(t)
        text = pending + decoder.decode(model.token_to_piece(t))
        hit = min((i for i in (text.find(st) for st in stops) if i >= 0), default=-1)
        if hit >= 0:
            if text[:hit]:
                yield text[:hit]
            ctx.finish_reason = "stop"
            return
        keep = 0             # the longest tail of text that begins some stop string
        for st in stops:
            for k in range(min(len(st) - 1, len(text)), 0, -1):
                if text.endswith(st[:k]):
                    keep = max(keep, k)
                    break
        pending = text[len(text) - keep:] if keep else ""
        if text[:len(text) - keep]:
            yield text[:len(text) - keep]
        try:
            ctx.step([t])
        except MoeError as e:
            if e.status != ERR_CONTEXT_FULL:
                raise
            ctx.finish_reason = "length"     # the context is full: its last token was generated, not stepped
            break
    else:
        ctx.finish_reason = "length"
    tail = pending + decoder.decode(b"", final=True)
    if tail:
        yield tail


if __name__ == "__main__":
    sys.stdout.write("moe %s (%s)\n" % (version(), lib._name))
