/* module.c - the Python face of the C core: kvstore._native.
 *
 * Two heap types:
 *   Arena  - one arena (guarded read/write, fault injection, lost bitmaps,
 *            drain, salvage): the foundation layer, used directly by tests
 *            and benchmarks.
 *   Engine - the record store on an Arena; kvstore.Store subclasses it so
 *            get/put/... are C methods called straight from Python.
 * All methods run with the GIL held: the GIL is the engine's lock. The one
 * place it is let go is the copy of a lost hugepage during salvage (the
 * page is quarantined; an access that meets it waits for the copy). The
 * only call back into Python is the read of a LOST key, which calls
 * self._lost_read(key, version, state, versioned) when the subclass defines
 * it (read-repair; state "range" when the key's index page was lost), else
 * raises KeyLostError.
 *
 * Multi-phase init; exceptions come from kvstore.errors and are kept in the
 * module state; each object caches its module state pointer.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "alloc.h"
#include "arena.h"
#include "checksum.h"
#include "engine.h"
#include "adopt.h"
#include "lazy.h"
#include "guard.h"
#include "index.h"
#include "resp.h"

typedef struct {
    PyObject *ArenaType, *EngineType;
    PyObject *Error, *KeyLostError, *UnrecoverableKeyError, *StoreFullError, *KeyTooLargeError,
        *ValueTooLargeError, *ClosedError, *ArenaError, *MemoryFaultError, *FaultInjectionError;
    PyObject *str_lost_read;
} modstate;

static struct PyModuleDef moddef;
static modstate *state_of(PyTypeObject *type)
{
    PyObject *m = PyType_GetModuleByDef(type, &moddef);
    return m ? (modstate *)PyModule_GetState(m) : NULL;
}

static unsigned long g_fork_gen;
static void on_fork_child(void) { g_fork_gen++; }

static const char *state_names[] = {"free", "present", "lost", "rebuilding", "unrecoverable"};

/* ------------------------------------------------------------------ args */

/* Borrow bytes from a bytes-like key/value. str gets a TypeError with the
 * hint to encode. view->obj is NULL when no PyBuffer_Release is needed. */
static int get_bytes(PyObject *o, Py_buffer *view, const char *what)
{
    if (PyBytes_CheckExact(o)) {
        view->obj = NULL;
        view->buf = PyBytes_AS_STRING(o);
        view->len = PyBytes_GET_SIZE(o);
        return 0;
    }
    if (PyUnicode_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be bytes-like, not str: encode it first, e.g. %s.encode()",
                     what, what);
        return -1;
    }
    if (PyObject_GetBuffer(o, view, PyBUF_SIMPLE) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be bytes-like (bytes, bytearray, memoryview), not %.100s",
                     what, Py_TYPE(o)->tp_name);
        return -1;
    }
    return 0;
}

static void put_bytes(Py_buffer *view)
{
    if (view->obj) PyBuffer_Release(view);
}

/* ----------------------------------------------------------------- Arena */

typedef struct {
    PyObject_HEAD
    kv_arena *a;
    modstate *st;
    int engines;
} ArenaObject;

static int parse_page_size(PyObject *o, size_t *out)
{
    if (o == NULL || o == Py_None) {
        *out = 0;
        return 0;
    }
    if (PyLong_Check(o)) {
        size_t v = PyLong_AsSize_t(o);
        if (v == (size_t)-1 && PyErr_Occurred()) return -1;
        if (v != 0 && v != 4096 && v != ((size_t)1 << 21) && v != ((size_t)1 << 30)) {
            PyErr_SetString(PyExc_ValueError, "page_size must be 4096, 2097152, 1073741824 or 0 (auto)");
            return -1;
        }
        *out = v;
        return 0;
    }
    const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (!s) {
        PyErr_SetString(PyExc_TypeError, "page_size must be \"auto\", \"1G\", \"2M\", \"4K\" or a size in bytes");
        return -1;
    }
    if (!strcmp(s, "auto")) *out = 0;
    else if (!strcasecmp(s, "1G") || !strcasecmp(s, "1GiB")) *out = (size_t)1 << 30;
    else if (!strcasecmp(s, "2M") || !strcasecmp(s, "2MiB")) *out = (size_t)1 << 21;
    else if (!strcasecmp(s, "4K") || !strcasecmp(s, "4KiB")) *out = 4096;
    else {
        PyErr_Format(PyExc_ValueError, "page_size must be \"auto\", \"1G\", \"2M\" or \"4K\", not %R", o);
        return -1;
    }
    return 0;
}

static int parse_policy(PyObject *o, int *out)
{
    const char *s = (o && o != Py_None && PyUnicode_Check(o)) ? PyUnicode_AsUTF8(o) : "auto";
    if (o && o != Py_None && !PyUnicode_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "kernel_policy must be \"auto\", \"keep_ue\" or \"mainline\"");
        return -1;
    }
    if (!strcmp(s, "auto")) *out = -1;
    else if (!strcmp(s, "keep_ue")) *out = KV_POLICY_KEEP_UE;
    else if (!strcmp(s, "mainline")) *out = KV_POLICY_MAINLINE;
    else {
        PyErr_Format(PyExc_ValueError, "kernel_policy must be \"auto\", \"keep_ue\" or \"mainline\", not %R", o);
        return -1;
    }
    return 0;
}

static PyObject *Arena_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"size", "page_size", "kernel_policy", NULL};
    Py_ssize_t size;
    PyObject *ps = NULL, *pol = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n|OO:Arena", kwlist, &size, &ps, &pol)) return NULL;
    if (size <= 0) {
        PyErr_SetString(PyExc_ValueError, "arena size must be positive");
        return NULL;
    }
    size_t page;
    int policy;
    if (parse_page_size(ps, &page) != 0 || parse_policy(pol, &policy) != 0) return NULL;
    modstate *st = state_of(type);
    if (!st) return NULL;
    ArenaObject *self = (ArenaObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->st = st;
    char err[768];
    kv_arena *a = kv_arena_create((size_t)size, page, policy, err, sizeof err);
    if (!a) {
        PyErr_SetString(st->ArenaError, err);
        Py_DECREF(self);
        return NULL;
    }
    self->a = a;
    return (PyObject *)self;
}

static void Arena_dealloc(ArenaObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    kv_arena_free(self->a);
    self->a = NULL;
    tp->tp_free(self);
    Py_DECREF(tp);
}

#define ARENA_OPEN(self)                                                        \
    do {                                                                        \
        if (!(self)->a) {                                                       \
            PyErr_SetString((self)->st->ClosedError, "the arena is closed");    \
            return NULL;                                                        \
        }                                                                       \
    } while (0)

static PyObject *fault_error(modstate *st, const char *what, size_t off)
{
    PyObject *msg = PyUnicode_FromFormat("%s at arena offset %zu (subpage %zu): memory lost", what, off,
                                         off >> KV_SUB_SHIFT);
    if (!msg) return NULL;
    PyObject *offo = PyLong_FromSize_t(off);
    PyObject *exc = offo ? PyObject_CallFunctionObjArgs(st->MemoryFaultError, msg, offo, NULL) : NULL;
    Py_DECREF(msg);
    Py_XDECREF(offo);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

static int check_range(kv_arena *a, Py_ssize_t off, Py_ssize_t n)
{
    if (off < 0 || n < 0 || (size_t)off > a->size || (size_t)n > a->size - (size_t)off) {
        PyErr_Format(PyExc_IndexError, "range [%zd, %zd) is outside the arena (%zu bytes)", off, off + n, a->size);
        return -1;
    }
    return 0;
}

static PyObject *Arena_read(ArenaObject *self, PyObject *args)
{
    Py_ssize_t off, n;
    if (!PyArg_ParseTuple(args, "nn:read", &off, &n)) return NULL;
    ARENA_OPEN(self);
    if (check_range(self->a, off, n)) return NULL;
    PyObject *b = PyBytes_FromStringAndSize(NULL, n);
    if (!b) return NULL;
    size_t fo;
    if (kv_arena_read(self->a, (size_t)off, PyBytes_AS_STRING(b), (size_t)n, &fo) != 0) {
        Py_DECREF(b);
        return fault_error(self->st, "read", fo);
    }
    return b;
}

static PyObject *Arena_write(ArenaObject *self, PyObject *args)
{
    Py_ssize_t off;
    PyObject *data;
    if (!PyArg_ParseTuple(args, "nO:write", &off, &data)) return NULL;
    ARENA_OPEN(self);
    Py_buffer v;
    if (get_bytes(data, &v, "data")) return NULL;
    if (check_range(self->a, off, v.len)) {
        put_bytes(&v);
        return NULL;
    }
    size_t fo;
    int rc = kv_arena_write(self->a, (size_t)off, v.buf, (size_t)v.len, &fo);
    put_bytes(&v);
    if (rc != 0) return fault_error(self->st, "write", fo);
    Py_RETURN_NONE;
}

static int parse_kind(PyObject *o, int *kind)
{
    const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    if (s && !strcmp(s, "ao")) *kind = KV_FAULT_AO;
    else if (s && !strcmp(s, "ar")) *kind = KV_FAULT_AR;
    else if (s && !strcmp(s, "hwpoison")) *kind = KV_FAULT_HWPOISON;
    else {
        PyErr_Format(PyExc_ValueError, "fault kind must be \"ao\", \"ar\" or \"hwpoison\", not %R", o);
        return -1;
    }
    return 0;
}

static PyObject *Arena_inject(ArenaObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"offset", "kind", NULL};
    Py_ssize_t off;
    PyObject *k = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n|O:inject", kwlist, &off, &k)) return NULL;
    ARENA_OPEN(self);
    int kind = KV_FAULT_AO;
    if (k && parse_kind(k, &kind)) return NULL;
    if (off < 0 || (size_t)off >= self->a->size) {
        PyErr_Format(PyExc_IndexError, "offset %zd is outside the arena (%zu bytes)", off, self->a->size);
        return NULL;
    }
    char err[256];
    if (kv_arena_inject(self->a, (size_t)off, kind, err, sizeof err) != 0) {
        PyErr_SetString(self->st->FaultInjectionError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *ranges_to_list(uint64_t (*r)[2], size_t n)
{
    PyObject *l = PyList_New((Py_ssize_t)n);
    if (!l) return NULL;
    for (size_t i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("(KK)", (unsigned long long)r[i][0], (unsigned long long)r[i][1]);
        if (!t) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, t);
    }
    return l;
}

static PyObject *Arena_drain(ArenaObject *self, PyObject *unused)
{
    ARENA_OPEN(self);
    PyObject *all = PyList_New(0);
    if (!all) return NULL;
    enum { CAP = 4096 };
    uint64_t(*r)[2] = PyMem_Malloc(CAP * sizeof *r);
    if (!r) {
        Py_DECREF(all);
        return PyErr_NoMemory();
    }
    do {
        size_t n = kv_arena_drain(self->a, r, CAP);
        PyObject *l = ranges_to_list(r, n);
        if (!l || PyList_SetSlice(all, PyList_GET_SIZE(all), PyList_GET_SIZE(all), l) != 0) {
            Py_XDECREF(l);
            Py_DECREF(all);
            PyMem_Free(r);
            return NULL;
        }
        Py_DECREF(l);
    } while (__atomic_load_n(&self->a->pending_flag, __ATOMIC_ACQUIRE));
    PyMem_Free(r);
    return all;
}

static PyObject *Arena_lost_subpages(ArenaObject *self, PyObject *unused)
{
    ARENA_OPEN(self);
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (size_t w = 0; w < self->a->nwords; w++) {
        uint64_t bits = __atomic_load_n(&self->a->lost[w], __ATOMIC_RELAXED);
        while (bits) {
            int b = __builtin_ctzll(bits);
            bits &= bits - 1;
            PyObject *i = PyLong_FromSize_t(w * 64 + (size_t)b);
            if (!i || PyList_Append(l, i) != 0) {
                Py_XDECREF(i);
                Py_DECREF(l);
                return NULL;
            }
            Py_DECREF(i);
        }
    }
    return l;
}

static PyObject *bitmap_bytes(const kv_arena *a, const uint64_t *bm)
{
    size_t nbytes = (a->nsub + 7) / 8;
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)nbytes);
    if (!b) return NULL;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(b);
    for (size_t i = 0; i < nbytes; i++) {
        uint64_t w = __atomic_load_n(&bm[i / 8], __ATOMIC_RELAXED);
        p[i] = (uint8_t)(w >> ((i % 8) * 8));
    }
    return b;
}

static PyObject *Arena_lost_bitmap(ArenaObject *self, PyObject *unused)
{
    ARENA_OPEN(self);
    return bitmap_bytes(self->a, self->a->lost);
}

static PyObject *Arena_poison_bitmap(ArenaObject *self, PyObject *unused)
{
    ARENA_OPEN(self);
    return bitmap_bytes(self->a, self->a->poison);
}

/* spares() -> [(page, fd, small)]: pages salvaged into memfds of their own. */
static PyObject *Arena_spares(ArenaObject *self, PyObject *unused)
{
    ARENA_OPEN(self);
    kv_arena *a = self->a;
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    for (size_t p = 0; p < a->npages; p++) {
        if (a->page_fd[p] == a->fd) continue;
        PyObject *t = Py_BuildValue("(nii)", (Py_ssize_t)p, a->page_fd[p], (int)a->page_small[p]);
        if (!t || PyList_Append(l, t) != 0) {
            Py_XDECREF(t);
            Py_DECREF(l);
            return NULL;
        }
        Py_DECREF(t);
    }
    return l;
}

/* Apply what the earlier process handed over with its arena (see
 * kv_arena_adopt_spare, kv_arena_adopt_lost): 0, or -1 with an exception. */
static int adopt_handover(modstate *st, kv_arena *a, PyObject *spares, PyObject *lost, PyObject *poison)
{
    if (spares && spares != Py_None) {
        PyObject *seq = PySequence_Fast(spares, "spares must be a sequence of (page, fd, small)");
        if (!seq) return -1;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
            Py_ssize_t page;
            int fd, small;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "nip:spares", &page, &fd, &small)) {
                Py_DECREF(seq);
                return -1;
            }
            if (page < 0) {
                PyErr_SetString(PyExc_ValueError, "a salvaged page number is negative");
                Py_DECREF(seq);
                return -1;
            }
            char err[256];
            if (kv_arena_adopt_spare(a, (size_t)page, fd, small, err, sizeof err) != 0) {
                PyErr_SetString(st->ArenaError, err);
                Py_DECREF(seq);
                return -1;
            }
        }
        Py_DECREF(seq);
    }
    if (lost && lost != Py_None) {
        Py_buffer lb, pb = {0};
        if (PyObject_GetBuffer(lost, &lb, PyBUF_SIMPLE) != 0) return -1;
        if (poison && poison != Py_None && PyObject_GetBuffer(poison, &pb, PyBUF_SIMPLE) != 0) {
            PyBuffer_Release(&lb);
            return -1;
        }
        const uint8_t *l = lb.buf, *q = pb.obj ? pb.buf : NULL;
        size_t nbits = (size_t)lb.len * 8;
        if (nbits > a->nsub) nbits = a->nsub;
        for (size_t i = 0; i < nbits; i++) {
            if (!((l[i / 8] >> (i % 8)) & 1)) continue;
            int poisoned = q && (Py_ssize_t)(i / 8) < pb.len && ((q[i / 8] >> (i % 8)) & 1);
            kv_arena_adopt_lost(a, i, 1, poisoned);
        }
        PyBuffer_Release(&lb);
        if (pb.obj) PyBuffer_Release(&pb);
    }
    return 0;
}

static PyObject *Arena_pread(ArenaObject *self, PyObject *args)
{
    Py_ssize_t off, n;
    if (!PyArg_ParseTuple(args, "nn:pread", &off, &n)) return NULL;
    ARENA_OPEN(self);
    if (check_range(self->a, off, n)) return NULL;
    PyObject *b = PyBytes_FromStringAndSize(NULL, n);
    if (!b) return NULL;
    long r = kv_arena_pread(self->a, (size_t)off, PyBytes_AS_STRING(b), (size_t)n);
    if (r < 0) {
        Py_DECREF(b);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (r != n) {
        PyObject *s = PyBytes_FromStringAndSize(PyBytes_AS_STRING(b), r);
        Py_DECREF(b);
        return s;
    }
    return b;
}

static PyObject *Arena_salvage(ArenaObject *self, PyObject *arg)
{
    ARENA_OPEN(self);
    size_t p = PyLong_AsSize_t(arg);
    if (p == (size_t)-1 && PyErr_Occurred()) return NULL;
    char err[256];
    long r = kv_arena_salvage(self->a, p, err, sizeof err);
    if (r < 0) {
        PyErr_SetString(self->st->ArenaError, err);
        return NULL;
    }
    return PyLong_FromLong(r);
}

static const char *backing_name(const kv_arena *a)
{
    return a->page_size == ((size_t)1 << 30) ? "hugetlb-1G"
           : a->page_size == ((size_t)1 << 21) ? "hugetlb-2M" : "memfd-4K";
}

static const char *page_label_short(const kv_arena *a)
{
    return a->page_size == ((size_t)1 << 30) ? "1G" : a->page_size == ((size_t)1 << 21) ? "2M" : "4K";
}

static int dset(PyObject *d, const char *k, PyObject *v)
{
    if (!v) return -1;
    int r = PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
    return r;
}

static int arena_stats_into(kv_arena *a, PyObject *d)
{
    kv_sigcounts c;
    kv_guard_counts(&c);
#define U(x) PyLong_FromUnsignedLongLong((unsigned long long)(x))
    if (dset(d, "backing", PyUnicode_FromString(backing_name(a))) ||
        dset(d, "page_size", PyUnicode_FromString(page_label_short(a))) ||
        dset(d, "page_bytes", U(a->page_size)) || dset(d, "hugepages", U(a->hugetlb ? a->npages : 0)) ||
        dset(d, "arena_bytes", U(a->size)) || dset(d, "keep_ue", PyBool_FromLong(a->keep_ue)) ||
        dset(d, "kernel_policy", PyUnicode_FromString(a->policy == KV_POLICY_KEEP_UE ? "keep_ue" : "mainline")) ||
        dset(d, "fallback_reason", a->reason[0] ? PyUnicode_FromString(a->reason) : Py_NewRef(Py_None)) ||
        dset(d, "lost_subpages", U(__atomic_load_n(&a->lost_subpages, __ATOMIC_RELAXED))) ||
        dset(d, "loss_events", U(__atomic_load_n(&a->lost_events, __ATOMIC_RELAXED))) ||
        dset(d, "injected_ao", U(a->injected[KV_FAULT_AO])) ||
        dset(d, "injected_ar", U(a->injected[KV_FAULT_AR])) ||
        dset(d, "injected_hwpoison", U(a->injected[KV_FAULT_HWPOISON])) ||
        dset(d, "pages_salvaged", U(a->pages_salvaged)) || dset(d, "salvage_failed", U(a->salvage_failed)) ||
        dset(d, "subpages_salvaged", U(a->subpages_salvaged)) ||
        dset(d, "pages_degraded_to_4k", U(a->pages_degraded)) ||
        dset(d, "signals_ao", U(c.ao)) || dset(d, "signals_ar", U(c.ar)) ||
        dset(d, "signals_adrerr", U(c.adrerr)) || dset(d, "signals_chained", U(c.chained)) ||
        dset(d, "signals_in_injection", U(c.in_injection)))
        return -1;
#undef U
    return 0;
}

static PyObject *Arena_stats(ArenaObject *self, PyObject *unused)
{
    ARENA_OPEN(self);
    PyObject *d = PyDict_New();
    if (!d || arena_stats_into(self->a, d)) {
        Py_XDECREF(d);
        return NULL;
    }
    return d;
}

static PyObject *Arena_pointer_chase(ArenaObject *self, PyObject *args)
{
    Py_ssize_t nbytes;
    unsigned long long steps, seed = 1;
    if (!PyArg_ParseTuple(args, "nK|K:pointer_chase", &nbytes, &steps, &seed)) return NULL;
    ARENA_OPEN(self);
    if (nbytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "nbytes must be positive");
        return NULL;
    }
    double ns = kv_arena_chase(self->a, (size_t)nbytes, steps, seed);
    if (ns < 0) {
        PyErr_SetString(self->st->MemoryFaultError, "pointer chase failed: no healthy subpages or a fault");
        return NULL;
    }
    return PyFloat_FromDouble(ns);
}

static PyObject *Arena__set_salvage_delay(ArenaObject *self, PyObject *arg)
{
    ARENA_OPEN(self);
    unsigned long us = PyLong_AsUnsignedLong(arg);
    if (us == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    self->a->salvage_delay_us = (uint32_t)us;
    Py_RETURN_NONE;
}

static PyObject *Arena_close(ArenaObject *self, PyObject *unused)
{
    if (self->engines > 0) {
        PyErr_SetString(PyExc_RuntimeError, "an Engine still uses this arena: close the Engine");
        return NULL;
    }
    kv_arena_free(self->a);
    self->a = NULL;
    Py_RETURN_NONE;
}

#define ARENA_GET(name, expr)                                                   \
    static PyObject *Arena_get_##name(ArenaObject *self, void *c)               \
    {                                                                           \
        ARENA_OPEN(self);                                                       \
        kv_arena *a = self->a;                                                  \
        return expr;                                                            \
    }
ARENA_GET(address, PyLong_FromVoidPtr(a->base))
ARENA_GET(size, PyLong_FromSize_t(a->size))
ARENA_GET(page_size, PyLong_FromSize_t(a->page_size))
ARENA_GET(npages, PyLong_FromSize_t(a->npages))
ARENA_GET(nsubpages, PyLong_FromSize_t(a->nsub))
ARENA_GET(hugetlb, PyBool_FromLong(a->hugetlb))
ARENA_GET(keep_ue, PyBool_FromLong(a->keep_ue))
ARENA_GET(kernel_policy, PyUnicode_FromString(a->policy == KV_POLICY_KEEP_UE ? "keep_ue" : "mainline"))
ARENA_GET(backing, PyUnicode_FromString(backing_name(a)))
ARENA_GET(eventfd, PyLong_FromLong(a->efd))
ARENA_GET(fd, PyLong_FromLong(a->fd))
ARENA_GET(fallback_reason, a->reason[0] ? PyUnicode_FromString(a->reason) : Py_NewRef(Py_None))

static PyObject *Arena_get_closed(ArenaObject *self, void *c) { return PyBool_FromLong(self->a == NULL); }

static PyObject *Arena_adopt(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"fd", "kernel_policy", "lost", "poison", "spares", NULL};
    int fd;
    PyObject *pol = NULL, *lost = NULL, *poison = NULL, *spares = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "i|O$OOO:adopt", kwlist, &fd, &pol, &lost, &poison, &spares))
        return NULL;
    int policy;
    if (parse_policy(pol, &policy) != 0) return NULL;
    modstate *st = state_of(type);
    if (!st) return NULL;
    ArenaObject *self = (ArenaObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->st = st;
    char err[768];
    kv_arena *a;
    Py_BEGIN_ALLOW_THREADS
    a = kv_arena_adopt(fd, policy, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (!a) {
        PyErr_SetString(st->ArenaError, err);
        Py_DECREF(self);
        return NULL;
    }
    self->a = a;
    if (adopt_handover(st, a, spares, lost, poison) != 0) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef Arena_methods[] = {
    {"adopt", (PyCFunction)(void (*)(void))Arena_adopt, METH_VARARGS | METH_KEYWORDS | METH_CLASS,
     "Arena.adopt(fd, kernel_policy='auto', *, lost=None, poison=None, spares=None): map an arena memfd "
     "inherited from an earlier process (the same pages; fd is duplicated, the caller keeps its own). "
     "lost, poison: that process's lost_bitmap() and poison_bitmap(); spares: its spares(), the "
     "memfds its salvaged pages live in (mapped over the same pages again)."},
    {"read", (PyCFunction)Arena_read, METH_VARARGS, "read(offset, n) -> bytes: guarded copy out of the arena."},
    {"write", (PyCFunction)Arena_write, METH_VARARGS, "write(offset, data): guarded copy into the arena."},
    {"inject", (PyCFunction)(void (*)(void))Arena_inject, METH_VARARGS | METH_KEYWORDS,
     "inject(offset, kind='ao'): simulate (ao, ar) or cause (hwpoison) a memory error."},
    {"drain", (PyCFunction)Arena_drain, METH_NOARGS,
     "drain() -> [(first_subpage, count)]: subpages lost since the last drain."},
    {"lost_subpages", (PyCFunction)Arena_lost_subpages, METH_NOARGS, "All lost subpages, sorted."},
    {"lost_bitmap", (PyCFunction)Arena_lost_bitmap, METH_NOARGS, "Lost bitmap: bit i of byte i//8 = subpage i."},
    {"poison_bitmap", (PyCFunction)Arena_poison_bitmap, METH_NOARGS,
     "Subpages whose bytes are gone for good (pread fails there), same layout as lost_bitmap()."},
    {"spares", (PyCFunction)Arena_spares, METH_NOARGS,
     "spares() -> [(page, fd, small)]: pages salvaged into memfds of their own (small: 4 KiB pages)."},
    {"pread", (PyCFunction)Arena_pread, METH_VARARGS,
     "pread(offset, n): read the backing memfd; EIO when it starts in a poisoned subpage, short before one."},
    {"salvage", (PyCFunction)Arena_salvage, METH_O,
     "salvage(page) -> subpages still lost: copy a lost page into a spare one."},
    {"stats", (PyCFunction)Arena_stats, METH_NOARGS, "Counters and configuration."},
    {"pointer_chase", (PyCFunction)Arena_pointer_chase, METH_VARARGS,
     "pointer_chase(nbytes, steps, seed=1) -> ns per step over healthy subpages (overwrites them)."},
    {"_set_salvage_delay", (PyCFunction)Arena__set_salvage_delay, METH_O,
     "Test hook: sleep this many microseconds inside every salvage copy."},
    {"close", (PyCFunction)Arena_close, METH_NOARGS, "Unmap the arena (idempotent)."},
    {NULL}};

#define G(n, doc) {#n, (getter)Arena_get_##n, NULL, doc, NULL}
static PyGetSetDef Arena_getset[] = {
    G(address, "Address of the mapping (for /proc/self/smaps checks)."),
    G(size, "Mapped bytes."),
    G(page_size, "Page size in bytes."),
    G(npages, "Number of pages."),
    G(nsubpages, "Number of 4 KiB subpages."),
    G(hugetlb, "True for HugeTLB backing."),
    G(keep_ue, "True if the kernel accepted MFD_MF_KEEP_UE_MAPPED."),
    G(kernel_policy, "\"keep_ue\" or \"mainline\" (real or simulated)."),
    G(backing, "\"hugetlb-1G\", \"hugetlb-2M\" or \"memfd-4K\"."),
    G(eventfd, "eventfd that becomes readable when memory is lost."),
    G(fd, "The arena memfd."),
    G(fallback_reason, "Why a smaller page size was used, or None."),
    G(closed, "True once closed."),
    {NULL}};
#undef G

static PyType_Slot Arena_slots[] = {
    {Py_tp_new, Arena_new},
    {Py_tp_dealloc, Arena_dealloc},
    {Py_tp_methods, Arena_methods},
    {Py_tp_getset, Arena_getset},
    {Py_tp_doc, "Arena(size, page_size='auto', kernel_policy='auto')\n\n"
                "Memory for the store in memfd(s) of whole pages, with a lost-subpage bitmap."},
    {0, NULL}};

static PyType_Spec Arena_spec = {"kvstore._native.Arena", sizeof(ArenaObject), 0, Py_TPFLAGS_DEFAULT,
                                 Arena_slots};

/* ---------------------------------------------------------------- Engine */

typedef struct {
    PyObject_HEAD
    kv_engine e;
    ArenaObject *arena;
    modstate *st;
    int ready;
    unsigned long gen;
    Py_ssize_t max_key, max_value;
    PyObject *dict;
    PyObject *weakrefs;
    int adopted;
    kv_adopt_report adopt;
    int fast_slots_on;                          /* resp_fast checks fast_slots */
    unsigned char fast_slots[KV_SLOTS / 8];     /* cluster mode: slots resp_fast may serve */
} EngineObject;

static int engine_unusable(EngineObject *self)
{
    if (!self->ready) {
        PyErr_SetString(self->st->ClosedError, "the store is closed");
        return 1;
    }
    if (self->gen != g_fork_gen) {
        PyErr_SetString(self->st->Error,
                        "this store was opened in the parent process: a forked child must open its own "
                        "Store (the arena, index included, is shared memory)");
        return 1;
    }
    return 0;
}
#define ENGINE_OK(self)                                                         \
    do {                                                                        \
        if (__builtin_expect(!(self)->ready || (self)->gen != g_fork_gen, 0) && \
            engine_unusable(self))                                              \
            return NULL;                                                        \
    } while (0)

static int key_arg(EngineObject *self, PyObject *o, Py_buffer *v)
{
    if (get_bytes(o, v, "key")) return -1;
    if (v->len > self->max_key) {
        PyErr_Format(self->st->KeyTooLargeError, "key is %zd bytes; the limit is %zd", v->len, self->max_key);
        put_bytes(v);
        return -1;
    }
    return 0;
}

static int value_arg(EngineObject *self, PyObject *o, Py_buffer *v)
{
    if (get_bytes(o, v, "value")) return -1;
    if (v->len > self->max_value) {
        PyErr_Format(self->st->ValueTooLargeError, "value is %zd bytes; the limit is %zd", v->len,
                     self->max_value);
        put_bytes(v);
        return -1;
    }
    return 0;
}

/* Look key up: KV_OK / KV_ABSENT / KV_LOSTKEY with *info, or -1 with an
 * exception set (bad key). */
static int lookup(EngineObject *self, PyObject *key, kv_info *info, uint64_t now, int want_len)
{
    Py_buffer k;
    if (key_arg(self, key, &k)) return -1;
    int rc = kv_eng_info(&self->e, k.buf, (uint32_t)k.len, now, want_len, info);
    put_bytes(&k);
    if (rc == KV_AGAIN) {
        PyErr_SetString(self->st->MemoryFaultError, "repeated memory faults while looking the key up");
        return -1;
    }
    return rc;
}

/* The engine's lock is the GIL: a salvage copy lets it go. */
static void *gil_unlock(void) { return PyEval_SaveThread(); }
static void gil_relock(void *tok) { PyEval_RestoreThread((PyThreadState *)tok); }

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"arena", "capacity", "max_key", "max_value", "adopt", NULL};
    PyObject *arena;
    Py_ssize_t cap = -1, max_key = KV_MAX_KEY, max_value = 512 * 1024 * 1024;
    int adopt = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|nnnp:Engine", kwlist, &arena, &cap, &max_key, &max_value,
                                     &adopt))
        return -1;
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Engine already initialised");
        return -1;
    }
    modstate *st = self->st;
    if (!PyObject_TypeCheck(arena, (PyTypeObject *)st->ArenaType)) {
        PyErr_SetString(PyExc_TypeError, "arena must be a kvstore._native.Arena");
        return -1;
    }
    ArenaObject *ao = (ArenaObject *)arena;
    if (!ao->a) {
        PyErr_SetString(st->ClosedError, "the arena is closed");
        return -1;
    }
    if (ao->engines) {
        PyErr_SetString(PyExc_ValueError, "the arena already has an Engine");
        return -1;
    }
    if (max_key < 0 || max_key > (Py_ssize_t)KV_MAX_KEY) {
        PyErr_Format(PyExc_ValueError, "max_key must be between 0 and %u", KV_MAX_KEY);
        return -1;
    }
    if (max_value < 0 || max_value > (Py_ssize_t)UINT32_MAX - KV_REC_HDR) {
        PyErr_SetString(PyExc_ValueError, "max_value must be between 0 and 4 GiB");
        return -1;
    }
    size_t capacity = cap < 0 ? ao->a->size : (size_t)cap;
    if (adopt) {
        char err[512];
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = kv_eng_adopt(&self->e, ao->a, &self->adopt, err, sizeof err);
        Py_END_ALLOW_THREADS
        if (rc != 0) {
            PyErr_SetString(st->ArenaError, err);
            return -1;
        }
        self->adopted = 1;
    } else if (kv_eng_init(&self->e, ao->a, capacity) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    self->e.unlock = gil_unlock;
    self->e.relock = gil_relock;
    Py_INCREF(ao);
    self->arena = ao;
    ao->engines++;
    self->max_key = max_key;
    self->max_value = max_value;
    self->gen = g_fork_gen;
    self->ready = 1;
    return 0;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    modstate *st = state_of(type);
    if (!st) return NULL;
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->st = st;
    return (PyObject *)self;
}

static void engine_release(EngineObject *self)
{
    if (self->ready) {
        kv_eng_free(&self->e);
        self->ready = 0;
    }
    if (self->arena) {
        self->arena->engines--;
        Py_CLEAR(self->arena);
    }
}

static int Engine_traverse(EngineObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->arena);
    Py_VISIT(self->dict);
    return 0;
}

static int Engine_clear(EngineObject *self)
{
    Py_CLEAR(self->dict);
    return 0;
}

static void Engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->weakrefs) PyObject_ClearWeakRefs((PyObject *)self);
    engine_release(self);
    Engine_clear(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyObject *raise_lost(EngineObject *self, PyObject *key, const kv_info *info)
{
    PyObject *exc = PyObject_CallFunction(
        info->state == KV_ST_UNRECOVERABLE ? self->st->UnrecoverableKeyError : self->st->KeyLostError, "OK", key,
        (unsigned long long)info->version);
    if (exc) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The key is LOST (or its index range is): let the subclass repair it
 * (state "range" when the key's index page was lost), else raise
 * KeyLostError. */
static PyObject *lost_read(EngineObject *self, PyObject *key, const kv_info *info, int versioned)
{
    if (Py_TYPE(self) != (PyTypeObject *)self->st->EngineType) {
        PyObject *args[] = {(PyObject *)self, key, NULL, NULL, versioned ? Py_True : Py_False};
        args[2] = PyLong_FromUnsignedLongLong(info->version);
        args[3] = PyUnicode_FromString(info->range_lost ? "range" : state_names[info->state]);
        PyObject *r = NULL;
        if (args[2] && args[3])
            r = PyObject_VectorcallMethod(self->st->str_lost_read, args, 5, NULL);
        Py_XDECREF(args[2]);
        Py_XDECREF(args[3]);
        if (r || !PyErr_ExceptionMatches(PyExc_AttributeError)) return r;
        PyErr_Clear();
    }
    return raise_lost(self, key, info);
}

/* Value destination: a bytes object (replaced if the read is retried). */
static void *bytes_buf(void *ctx, size_t n)
{
    PyObject **o = ctx;
    Py_CLEAR(*o);
    *o = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    return *o ? PyBytes_AS_STRING(*o) : NULL;
}

/* Read key: the value (new reference), Py_None (absent, borrowed as new
 * ref), or NULL with *lost set and info filled (lost), or NULL with an
 * exception. */
static PyObject *read_key(EngineObject *self, PyObject *key, kv_info *info, uint64_t now, int *lost)
{
    Py_buffer k;
    *lost = 0;
    if (key_arg(self, key, &k)) return NULL;
    PyObject *val = NULL;
    int rc = kv_eng_get(&self->e, k.buf, (uint32_t)k.len, now, bytes_buf, &val, info);
    put_bytes(&k);
    if (rc == KV_OK) return val;
    Py_XDECREF(val);
    if (rc == KV_ABSENT) Py_RETURN_NONE;
    if (rc == KV_LOSTKEY) {
        *lost = 1;
        return NULL;
    }
    if (rc == KV_AGAIN) {
        PyErr_SetString(self->st->MemoryFaultError, "repeated memory faults while reading the key");
        return NULL;
    }
    if (!PyErr_Occurred()) PyErr_NoMemory();
    return NULL;
}

static PyObject *get_impl(EngineObject *self, PyObject *key, int versioned)
{
    ENGINE_OK(self);
    kv_info info;
    int lost;
    PyObject *b = read_key(self, key, &info, 0, &lost);
    if (b) {
        if (!versioned || b == Py_None) return b;
        return Py_BuildValue("(KN)", (unsigned long long)info.version, b);
    }
    if (!lost) return NULL;
    return lost_read(self, key, &info, versioned);
}

static PyObject *Engine_touches_lost(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    Py_buffer b;
    if (PyObject_GetBuffer(key, &b, PyBUF_SIMPLE) != 0) return NULL;
    int r = 0;
    if (b.len > 0 && b.len <= self->max_key && b.len <= (Py_ssize_t)KV_MAX_KEY)
        r = kv_eng_touches_lost(&self->e, b.buf, (uint32_t)b.len);
    PyBuffer_Release(&b);
    return PyBool_FromLong(r);
}

static PyObject *Engine_get(EngineObject *self, PyObject *key) { return get_impl(self, key, 0); }
static PyObject *Engine_get_versioned(EngineObject *self, PyObject *key) { return get_impl(self, key, 1); }

static int ttl_to_ms(PyObject *ttl, uint64_t *exp_ms)
{
    if (ttl == NULL || ttl == Py_None) {
        *exp_ms = 0;
        return 0;
    }
    double s = PyFloat_AsDouble(ttl);
    if (s == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "ttl must be a number of seconds or None, not %.100s", Py_TYPE(ttl)->tp_name);
        return -1;
    }
    if (!(s > 0) || s > 1e12) {
        PyErr_SetString(PyExc_ValueError, "ttl must be a positive number of seconds");
        return -1;
    }
    uint64_t ms = (uint64_t)(s * 1000.0 + 0.999);
    *exp_ms = kv_now_ms() + (ms ? ms : 1);
    return 0;
}

static PyObject *put_error(EngineObject *self, int rc, size_t need)
{
    if (rc == KV_FULL)
        PyErr_Format(self->st->StoreFullError,
                     "no room for a %zu-byte record (capacity %zu bytes, %zu free subpages); nothing was written",
                     need, self->e.al.nsub * (size_t)4096, self->e.al.nfree);
    else
        PyErr_NoMemory();
    return NULL;
}

static PyObject *put_impl(EngineObject *self, PyObject *key, PyObject *value, uint64_t version, uint64_t exp)
{
    Py_buffer k, v;
    if (key_arg(self, key, &k)) return NULL;
    if (value_arg(self, value, &v)) {
        put_bytes(&k);
        return NULL;
    }
    uint64_t out;
    int rc = kv_eng_put(&self->e, k.buf, (uint32_t)k.len, v.buf, (size_t)v.len, version, exp, &out);
    size_t need = KV_REC_HDR + (size_t)v.len;
    put_bytes(&k);
    put_bytes(&v);
    if (rc != KV_OK) return put_error(self, rc, need);
    return PyLong_FromUnsignedLongLong(out);
}

/* put(key, value, ttl=None) */
static PyObject *Engine_put(EngineObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    ENGINE_OK(self);
    PyObject *ttl = nargs >= 3 ? args[2] : NULL, *at = NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i);
        if (PyUnicode_CompareWithASCIIString(name, "ttl") == 0 && !ttl) {
            ttl = args[nargs + i];
        } else if (PyUnicode_CompareWithASCIIString(name, "expire_at_ms") == 0 && !at) {
            at = args[nargs + i];
        } else {
            PyErr_Format(PyExc_TypeError, "put() got an unexpected keyword argument %R", name);
            return NULL;
        }
    }
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "put(key, value, ttl=None, *, expire_at_ms=None) takes 2 or 3 arguments");
        return NULL;
    }
    uint64_t exp;
    if (at && at != Py_None) {
        if (ttl && ttl != Py_None) {
            PyErr_SetString(PyExc_TypeError, "put(): give ttl or expire_at_ms, not both");
            return NULL;
        }
        /* absolute expiry in ms since the epoch: 0 none, -1 keep the key's */
        long long v = PyLong_AsLongLong(at);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (v < -1) {
            PyErr_SetString(PyExc_ValueError, "expire_at_ms must be >= 0 (or -1: keep)");
            return NULL;
        }
        exp = v < 0 ? UINT64_MAX : (uint64_t)v;
    } else if (ttl_to_ms(ttl, &exp)) {
        return NULL;
    }
    return put_impl(self, args[0], args[1], 0, exp);
}

/* put_versioned(key, value, version, expire_at_ms=0): apply a write that
 * already has a version (replication). expire_at_ms: 0 none, -1 keep. */
static PyObject *Engine_put_versioned(EngineObject *self, PyObject *args)
{
    PyObject *key, *value;
    unsigned long long version;
    long long exp = 0;
    if (!PyArg_ParseTuple(args, "OOK|L:put_versioned", &key, &value, &version, &exp)) return NULL;
    ENGINE_OK(self);
    if (version == 0 || version > KV_VERSION_MASK) {
        PyErr_SetString(PyExc_ValueError, "version must be between 1 and 2**48-1");
        return NULL;
    }
    return put_impl(self, key, value, version, exp < 0 ? UINT64_MAX : (uint64_t)exp);
}

static PyObject *Engine_delete(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    Py_buffer k;
    if (key_arg(self, key, &k)) return NULL;
    int r = kv_eng_delete(&self->e, k.buf, (uint32_t)k.len);
    put_bytes(&k);
    if (r < 0) {
        PyErr_SetString(self->st->StoreFullError,
                        "no room to record the delete of a key whose index range is being rebuilt; nothing was changed");
        return NULL;
    }
    return PyBool_FromLong(r);
}

/* exists: a LOST key exists; a key in a lost index range is read (repaired)
 * to find out. */
static int exists_impl(EngineObject *self, PyObject *key)
{
    kv_info info;
    int rc = lookup(self, key, &info, 0, 0);
    if (rc < 0) return -1;
    if (rc == KV_LOSTKEY && info.range_lost) {
        PyObject *v = lost_read(self, key, &info, 0);
        if (!v) return -1;
        int r = v != Py_None;
        Py_DECREF(v);
        return r;
    }
    return rc != KV_ABSENT;
}

static PyObject *Engine_exists(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    int r = exists_impl(self, key);
    return r < 0 ? NULL : PyBool_FromLong(r);
}

static int Engine_contains(EngineObject *self, PyObject *key)
{
    if ((!self->ready || self->gen != g_fork_gen) && engine_unusable(self)) return -1;
    return exists_impl(self, key);
}

static Py_ssize_t Engine_len(EngineObject *self)
{
    if ((!self->ready || self->gen != g_fork_gen) && engine_unusable(self)) return -1;
    kv_eng_check(&self->e);
    return (Py_ssize_t)self->e.nkeys;
}

/* mget(keys, marker=None): a list of values; None for absent keys. A LOST
 * key gets `marker` when one is given, else goes through _lost_read. */
static PyObject *Engine_mget(EngineObject *self, PyObject *args)
{
    PyObject *keys, *marker = Py_None;
    if (!PyArg_ParseTuple(args, "O|O:mget", &keys, &marker)) return NULL;
    ENGINE_OK(self);
    /* a tuple of our own: the GIL may be let go during a salvage, and the
     * caller's list could change meanwhile */
    PyObject *seq = PyTuple_Check(keys) ? Py_NewRef(keys) : PySequence_Tuple(keys);
    if (!seq) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError, "mget() needs a sequence of keys");
        }
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    PyObject **items = &PyTuple_GET_ITEM(seq, 0);
    PyObject *out = PyList_New(n);
    if (!out) goto fail;
    uint64_t now = kv_now_ms();
    for (Py_ssize_t i = 0; i < n; i++) {
        kv_info info;
        int lost;
        PyObject *val = read_key(self, items[i], &info, now, &lost);
        if (!val) {
            if (!lost) goto fail;
            if (marker != Py_None) val = Py_NewRef(marker);
            else if (!(val = lost_read(self, items[i], &info, 0))) goto fail;
        }
        PyList_SET_ITEM(out, i, val);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/* mput(mapping or iterable of (key, value)) -> [versions]. Every key and
 * value is checked before anything is written. */
static PyObject *Engine_mput(EngineObject *self, PyObject *arg)
{
    ENGINE_OK(self);
    PyObject *pairs = PyDict_Check(arg) ? PyDict_Items(arg) : PySequence_List(arg);
    if (!pairs) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(pairs);
    PyObject *out = NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(pairs, i);
        if (!PyTuple_Check(p) && !PyList_Check(p)) goto badpair;
        if (PySequence_Fast_GET_SIZE(p) != 2) goto badpair;
        Py_buffer k, v;
        if (key_arg(self, PySequence_Fast_GET_ITEM(p, 0), &k)) goto done;
        put_bytes(&k);
        if (value_arg(self, PySequence_Fast_GET_ITEM(p, 1), &v)) goto done;
        put_bytes(&v);
    }
    out = PyList_New(n);
    if (!out) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *p = PyList_GET_ITEM(pairs, i);
        PyObject *ver = put_impl(self, PySequence_Fast_GET_ITEM(p, 0), PySequence_Fast_GET_ITEM(p, 1), 0, 0);
        if (!ver) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, ver);
    }
    goto done;
badpair:
    PyErr_SetString(PyExc_TypeError, "mput() needs a mapping or an iterable of (key, value) pairs");
done:
    Py_DECREF(pairs);
    return out;
}

/* expire_at_ms(key, abs_ms, version=0) -> bool: set (abs_ms > 0) or clear
 * (0) expiry. A change takes a version (the next one, or `version` when a
 * primary's stream gives it); see kv_eng_set_ttl. */
static PyObject *Engine_expire_at_ms(EngineObject *self, PyObject *args)
{
    PyObject *key;
    unsigned long long at, version = 0;
    if (!PyArg_ParseTuple(args, "OK|K:expire_at_ms", &key, &at, &version)) return NULL;
    ENGINE_OK(self);
    if (version > KV_VERSION_MASK) {
        PyErr_SetString(PyExc_ValueError, "version must be between 0 and 2**48-1");
        return NULL;
    }
    Py_buffer k;
    if (key_arg(self, key, &k)) return NULL;
    int had = 0;
    uint64_t nv = 0;
    int rc = kv_eng_set_ttl(&self->e, k.buf, (uint32_t)k.len, at, version, &had, &nv);
    put_bytes(&k);
    if (rc == KV_ABSENT) Py_RETURN_FALSE;
    if (rc == KV_LOSTKEY) {
        kv_info info;
        int r = lookup(self, key, &info, 0, 0);
        if (r < 0) return NULL;
        return raise_lost(self, key, &info);
    }
    if (rc == KV_FULL) return put_error(self, KV_FULL, 16);
    if (rc == KV_SKIP) Py_RETURN_FALSE;
    if (at == 0) return PyBool_FromLong(had);
    Py_RETURN_TRUE;
}

/* ttl_ms(key) -> ms left, -1 no expiry, -2 absent */
static PyObject *Engine_ttl_ms(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    kv_info info;
    uint64_t now = kv_now_ms();
    int rc = lookup(self, key, &info, now, 0);
    if (rc < 0) return NULL;
    if (rc == KV_ABSENT) return PyLong_FromLong(-2);
    if (rc == KV_LOSTKEY && info.range_lost) return raise_lost(self, key, &info);
    if (!info.expire_ms) return PyLong_FromLong(-1);
    return PyLong_FromUnsignedLongLong(info.expire_ms > now ? info.expire_ms - now : 0);
}

/* expire_at(key) -> absolute expiry ms or 0 (used by replication/fetch). */
static PyObject *Engine_expire_at(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    kv_info info;
    int rc = lookup(self, key, &info, 0, 0);
    if (rc < 0) return NULL;
    if (rc == KV_ABSENT || info.range_lost) return PyLong_FromLong(0);
    return PyLong_FromUnsignedLongLong(info.expire_ms);
}

/* ---- scans over the index, page by page (copies) ---- */

typedef struct {
    EngineObject *self;
    PyObject *list;
    int what;                 /* 0 keys, 1 lost keys, 2 entries with hashes, 3 lost ranges,
                                 4 keys newer than since */
    uint64_t lo, hi, now;
    uint64_t since;
} scan_ctx;

static void *scan_keybuf(void *ctx, size_t n)
{
    PyObject **o = ctx;
    Py_CLEAR(*o);
    *o = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    return *o ? PyBytes_AS_STRING(*o) : NULL;
}

static int scan_visit(void *vctx, const kv_ipage *p, uint64_t plo, uint64_t phi)
{
    scan_ctx *c = vctx;
    if (!p || (p->flags & KV_IP_LOSTRANGE)) {
        if (c->what == 2 || c->what == 3) {
            uint64_t lo = plo < c->lo ? c->lo : plo, hi = phi > c->hi ? c->hi : phi;
            PyObject *t = Py_BuildValue("(sKKK)", "range", (unsigned long long)lo, (unsigned long long)hi,
                                        (unsigned long long)(p ? p->lost_at : c->self->e.version));
            if (!t || PyList_Append(c->list, t) != 0) {
                Py_XDECREF(t);
                return -1;
            }
            Py_DECREF(t);
        }
        if (!p) return 0;
    }
    if (c->what == 3) return 0;
    kv_ipage *pp = (kv_ipage *)p;
    for (uint32_t i = 0; i < p->n; i++) {
        const kv_entry *en = kv_ip_entry(pp, i);
        int st = kv_e_state(en);
        if (st == KV_ST_TOMB || st == KV_ST_FREE) continue;
        if (c->what == 1 && st < KV_ST_LOST) continue;
        if (c->what == 4 && kv_e_version(en) <= c->since) continue;
        if (c->what == 0 && (kv_e_flags(en) & KV_F_TTL) && kv_e_ttl(en) && kv_e_ttl(en) <= c->now) continue;
        uint32_t klen = kv_e_klen(en);
        PyObject *k = NULL;
        uint64_t h;
        if (kv_e_flags(en) & KV_F_LONG) {
            h = kv_e_fullhash(en);
            if (st != KV_ST_PRESENT) {
                if (c->what == 2 && h >= c->lo && h <= c->hi) {
                    PyObject *t = Py_BuildValue("(sKKK)", "range", (unsigned long long)h, (unsigned long long)h,
                                                (unsigned long long)kv_e_version(en));
                    if (!t || PyList_Append(c->list, t) != 0) {
                        Py_XDECREF(t);
                        return -1;
                    }
                    Py_DECREF(t);
                }
                continue;         /* the name went with the record */
            }
            if (c->what == 2 && (h < c->lo || h > c->hi)) continue;
            if (kv_eng_read_longkey(&c->self->e, kv_e_off(en), klen, scan_keybuf, &k) != KV_OK) {
                Py_XDECREF(k);
                if (PyErr_Occurred()) return -1;
                continue;
            }
        } else {
            if (c->what == 2) {
                h = kv_hash(en->key, klen);
                if (h < c->lo || h > c->hi) continue;
            }
            k = PyBytes_FromStringAndSize((const char *)en->key, klen);
            if (!k) return -1;
        }
        PyObject *item = k;
        if (c->what == 1)
            item = Py_BuildValue("(NKs)", k, (unsigned long long)kv_e_version(en), state_names[st]);
        else if (c->what == 2)
            item = Py_BuildValue("(sNKs)", "key", k, (unsigned long long)kv_e_version(en), state_names[st]);
        if (!item || PyList_Append(c->list, item) != 0) {
            Py_XDECREF(item);
            return -1;
        }
        Py_DECREF(item);
    }
    return 0;
}

static PyObject *scan_list(EngineObject *self, int what, uint64_t lo, uint64_t hi)
{
    scan_ctx c = {self, PyList_New(0), what, lo, hi, kv_now_ms(), 0};
    if (!c.list) return NULL;
    if (kv_eng_scan(&self->e, lo, hi, scan_visit, &c) != 0) {
        if (!PyErr_Occurred()) PyErr_SetString(self->st->MemoryFaultError, "the index directory is unreadable");
        Py_DECREF(c.list);
        return NULL;
    }
    return c.list;
}

static PyObject *Engine_keys(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    return scan_list(self, 0, 0, ~0ULL);
}

static PyObject *Engine_lost_keys(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    return scan_list(self, 1, 0, ~0ULL);
}

/* keys_since(version) -> [key] of every entry (present or lost, expired or
 * not) whose version is above version. A long key that is not present is
 * left out: its name went with its record. */
static PyObject *Engine_keys_since(EngineObject *self, PyObject *arg)
{
    ENGINE_OK(self);
    unsigned long long v = PyLong_AsUnsignedLongLong(arg);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    scan_ctx c = {self, PyList_New(0), 4, 0, ~0ULL, kv_now_ms(), v};
    if (!c.list) return NULL;
    if (kv_eng_scan(&self->e, 0, ~0ULL, scan_visit, &c) != 0) {
        if (!PyErr_Occurred()) PyErr_SetString(self->st->MemoryFaultError, "the index directory is unreadable");
        Py_DECREF(c.list);
        return NULL;
    }
    return c.list;
}

/* scan_range(lo, hi) -> [("key", key, version, state) | ("range", lo, hi, lost_at)]
 * for every key with lo <= key_hash(key) <= hi (hi inclusive), and every
 * part of [lo, hi] whose index was lost (not known here). */
static PyObject *Engine_scan_range(EngineObject *self, PyObject *args)
{
    unsigned long long lo, hi;
    if (!PyArg_ParseTuple(args, "KK:scan_range", &lo, &hi)) return NULL;
    ENGINE_OK(self);
    if (lo > hi) return PyList_New(0);
    return scan_list(self, 2, lo, hi);
}

/* lost_ranges() -> [(lo, hi, lost_at)]: index ranges currently not known. */
static PyObject *Engine_lost_ranges(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    PyObject *l = scan_list(self, 3, 0, ~0ULL);
    if (!l) return NULL;
    Py_ssize_t n = PyList_GET_SIZE(l);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *t = PyList_GET_ITEM(l, i);
        PyList_SET_ITEM(out, i, PyTuple_GetSlice(t, 1, 4));
    }
    Py_DECREF(l);
    return out;
}

static PyObject *Engine_locate(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    kv_info info;
    int rc = lookup(self, key, &info, 0, 1);
    if (rc < 0) return NULL;
    if (rc == KV_ABSENT) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    if (rc != KV_OK || info.rec_len == 0) return raise_lost(self, key, &info);
    return Py_BuildValue("(Kn)", (unsigned long long)info.rec_off, (Py_ssize_t)info.rec_len);
}

/* locate_entry(key) -> (arena offset, length) of the key's index entry. */
static PyObject *Engine_locate_entry(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    kv_info info;
    int rc = lookup(self, key, &info, 0, 0);
    if (rc < 0) return NULL;
    if (rc == KV_ABSENT) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    if (info.range_lost) return raise_lost(self, key, &info);
    return Py_BuildValue("(Kn)", (unsigned long long)info.entry_off, (Py_ssize_t)info.entry_len);
}

/* locate_allocator() -> (arena offset, length) of the allocator's metadata
 * region, or None while it is in process memory. */
static PyObject *Engine_locate_allocator(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    kv_eng_check(&self->e);
    if (!self->e.meta_n) Py_RETURN_NONE;
    return Py_BuildValue("(KK)", (unsigned long long)self->e.meta_sub * 4096ULL,
                         (unsigned long long)kv_eng_meta_bytes(&self->e));
}

/* subpage_kind(s) -> ("free" | "records" | "large" | "lost" | "directory" |
 * "index" | "header" | "allocator", lo, hi): what the allocator holds in subpage s; for an index page
 * its hash range [lo, hi] (hi inclusive), else (kind, 0, 0). */
static PyObject *Engine_subpage_kind(EngineObject *self, PyObject *arg)
{
    ENGINE_OK(self);
    size_t s = PyLong_AsSize_t(arg);
    if (s == (size_t)-1 && PyErr_Occurred()) return NULL;
    if (s >= self->e.al.nsub) {
        PyErr_Format(PyExc_IndexError, "subpage %zu outside the store (%zu subpages)", s, self->e.al.nsub);
        return NULL;
    }
    kv_eng_check(&self->e);
    kv_meta m = self->e.al.meta[s];
    static const char *names[] = {"free", "records", "large", "large", "lost", "index", "directory", "header"};
    int k = kv_sp_kind(m);
    if (k == KV_SP_HDR && s != 0) return Py_BuildValue("(sii)", "allocator", 0, 0);
    if (k == KV_SP_INDEX)
        return Py_BuildValue("(sKK)", "index", (unsigned long long)kv_sp_ilo(m), (unsigned long long)kv_sp_ihi(m));
    return Py_BuildValue("(sii)", names[k], 0, 0);
}

static PyObject *Engine_recover(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    kv_recover_stats s;
    kv_eng_recover(&self->e, &s);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:s}", "ranges", (unsigned long long)s.ranges,
                         "subpages", (unsigned long long)s.subpages, "keys_lost",
                         (unsigned long long)s.keys_lost, "pages_salvaged", (unsigned long long)s.pages_salvaged,
                         "subpages_salvaged", (unsigned long long)s.subpages_salvaged, "salvage_failed",
                         (unsigned long long)s.salvage_failed, "subpages_quarantined",
                         (unsigned long long)s.subpages_quarantined, "index_pages_lost",
                         (unsigned long long)s.index_pages_lost, "orphans_reclaimed",
                         (unsigned long long)s.orphans_reclaimed, "salvage_error", s.salvage_error);
}

static int state_from_name(PyObject *o)
{
    const char *s = PyUnicode_Check(o) ? PyUnicode_AsUTF8(o) : NULL;
    for (int i = KV_ST_LOST; s && i <= KV_ST_UNRECOVERABLE; i++)
        if (!strcmp(s, state_names[i])) return i;
    PyErr_Format(PyExc_ValueError, "state must be \"lost\", \"rebuilding\" or \"unrecoverable\", not %R", o);
    return -1;
}

/* take_lost(max=0, mark=None) -> [(key, version, state)]: every key that
 * became LOST since the last call, exactly once, with its state now ("present"
 * if it was repaired or rewritten meanwhile); those still LOST move to state
 * `mark` ("rebuilding") when given. Keys deleted since, or whose index range
 * was lost since (see take_lost_ranges), are left out. */
static PyObject *Engine_take_lost(EngineObject *self, PyObject *args)
{
    Py_ssize_t max = 0;
    PyObject *mark = Py_None;
    if (!PyArg_ParseTuple(args, "|nO:take_lost", &max, &mark)) return NULL;
    ENGINE_OK(self);
    kv_eng_check(&self->e);
    int to = -1;
    if (mark != Py_None && (to = state_from_name(mark)) < 0) return NULL;
    kv_engine *e = &self->e;
    size_t take = max > 0 && (size_t)max < e->lostq_n ? (size_t)max : e->lostq_n;
    PyObject *l = PyList_New(0);
    if (!l) return NULL;
    if (!take) return l;
    /* Detach the batch first: the lookups below may wait for the recovery
     * thread with the engine unlocked, and recovery appends to (reallocates)
     * the queue or replaces it (a metadata rebuild). */
    kv_lostkey *batch = malloc(take * sizeof *batch);
    if (!batch) {
        Py_DECREF(l);
        return PyErr_NoMemory();
    }
    memcpy(batch, e->lostq, take * sizeof *batch);
    memmove(e->lostq, e->lostq + take, (e->lostq_n - take) * sizeof *e->lostq);
    e->lostq_n -= take;
    size_t i = 0;
    for (; i < take; i++) {
        const kv_lostkey *q = &batch[i];
        kv_info info;
        int rc = kv_eng_info(e, q->key, q->klen, 0, 0, &info);
        if (rc == KV_ABSENT || rc == KV_AGAIN || (rc == KV_LOSTKEY && info.range_lost)) continue;
        int st = rc == KV_OK ? KV_ST_PRESENT : info.state;
        if (to >= 0 && st == KV_ST_LOST && kv_eng_set_state(e, q->key, q->klen, to)) st = to;
        PyObject *t = Py_BuildValue("(y#Ks)", q->key, (Py_ssize_t)q->klen, (unsigned long long)info.version,
                                    state_names[st]);
        if (!t || PyList_Append(l, t) != 0) {
            Py_XDECREF(t);
            Py_CLEAR(l);
            break;
        }
        Py_DECREF(t);
    }
    if (!l) {
        /* give back what was not reported (this one included): front of the queue */
        size_t rest = take - i;
        size_t cap = e->lostq_n + rest > e->lostq_cap ? e->lostq_n + rest : e->lostq_cap;
        kv_lostkey *nq = realloc(e->lostq, cap * sizeof *nq);
        if (nq) {
            memmove(nq + rest, nq, e->lostq_n * sizeof *nq);
            memcpy(nq, batch + i, rest * sizeof *nq);
            e->lostq = nq;
            e->lostq_cap = cap;
            e->lostq_n += rest;
            take = i;
        }
    }
    for (size_t j = 0; j < take; j++) free(batch[j].key);
    free(batch);
    return l;
}

/* take_lost_ranges() -> [(lo, hi, version)]: hash ranges (hi inclusive)
 * whose index entries were lost since the last call, with the store's
 * version at the loss: a source must have applied every write up to that
 * version before its answer for the range can be installed. */
static PyObject *Engine_take_lost_ranges(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    kv_eng_check(&self->e);
    kv_engine *e = &self->e;
    PyObject *l = PyList_New((Py_ssize_t)e->lr_n);
    if (!l) return NULL;
    for (size_t i = 0; i < e->lr_n; i++) {
        PyObject *t = Py_BuildValue("(KKK)", (unsigned long long)e->lranges[i].lo,
                                    (unsigned long long)e->lranges[i].hi, (unsigned long long)e->lranges[i].version);
        if (!t) {
            Py_DECREF(l);
            return NULL;
        }
        PyList_SET_ITEM(l, (Py_ssize_t)i, t);
    }
    e->lr_n = 0;
    return l;
}

/* set_state(key, state) -> bool: move a non-present key between lost,
 * rebuilding and unrecoverable. */
static PyObject *Engine_set_state(EngineObject *self, PyObject *args)
{
    PyObject *key, *state;
    if (!PyArg_ParseTuple(args, "OO:set_state", &key, &state)) return NULL;
    ENGINE_OK(self);
    int to = state_from_name(state);
    if (to < 0) return NULL;
    Py_buffer k;
    if (key_arg(self, key, &k)) return NULL;
    int r = kv_eng_set_state(&self->e, k.buf, (uint32_t)k.len, to);
    put_bytes(&k);
    return PyBool_FromLong(r);
}

/* state(key) -> "absent" | "present" | "lost" | "rebuilding" | "unrecoverable"
 * | "range" (its index range was lost and is not rebuilt yet) */
static PyObject *Engine_state(EngineObject *self, PyObject *key)
{
    ENGINE_OK(self);
    kv_info info;
    int rc = lookup(self, key, &info, 0, 0);
    if (rc < 0) return NULL;
    if (rc == KV_ABSENT) return PyUnicode_FromString("absent");
    if (rc == KV_OK) return PyUnicode_FromString("present");
    return PyUnicode_FromString(info.range_lost ? "range" : state_names[info.state]);
}

/* install(key, value, version, expire_at_ms=0, from_range=0) ->
 * "installed" | "stale" | "skipped". from_range: the version the source had
 * applied up to, when the value came from fetch_hash_range. */
static PyObject *Engine_install(EngineObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"key", "value", "version", "expire_at_ms", "from_range", NULL};
    PyObject *key, *value;
    unsigned long long version, exp = 0, from_range = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOK|KK:install", kwlist, &key, &value, &version, &exp,
                                     &from_range))
        return NULL;
    ENGINE_OK(self);
    if (version > KV_VERSION_MASK) {
        PyErr_SetString(PyExc_ValueError, "version must be below 2**48");
        return NULL;
    }
    Py_buffer k, v;
    if (key_arg(self, key, &k)) return NULL;
    if (value_arg(self, value, &v)) {
        put_bytes(&k);
        return NULL;
    }
    int rc = kv_eng_install(&self->e, k.buf, (uint32_t)k.len, v.buf, (size_t)v.len, version, exp, from_range);
    size_t need = KV_REC_HDR + (size_t)v.len;
    put_bytes(&k);
    put_bytes(&v);
    switch (rc) {
    case KV_OK: return PyUnicode_FromString("installed");
    case KV_STALE: return PyUnicode_FromString("stale");
    case KV_SKIP: return PyUnicode_FromString("skipped");
    default: return put_error(self, rc, need);
    }
}

/* The body of mark_absent / mark_lost: parse (key, version), call fn, and
 * answer True when it changed the index (KV_OK), False when it had nothing to
 * do, StoreFullError when there was no room. versioned: refuse version 0 and
 * versions past 48 bits (a LOST entry must carry a real version). */
typedef int (*key_version_fn)(kv_engine *, const void *, uint32_t, uint64_t);

static PyObject *key_version_op(EngineObject *self, PyObject *args, const char *fmt,
                                key_version_fn fn, int versioned)
{
    PyObject *key;
    unsigned long long version;
    if (!PyArg_ParseTuple(args, fmt, &key, &version)) return NULL;
    ENGINE_OK(self);
    if (versioned && (version == 0 || version > KV_VERSION_MASK)) {
        PyErr_SetString(PyExc_ValueError, "version must be between 1 and 2**48 - 1");
        return NULL;
    }
    Py_buffer k;
    if (key_arg(self, key, &k)) return NULL;
    int rc = fn(&self->e, k.buf, (uint32_t)k.len, version);
    put_bytes(&k);
    if (rc == KV_FULL) return put_error(self, rc, 16);
    return PyBool_FromLong(rc == KV_OK);
}

/* mark_absent(key, version) -> bool: a source caught up to version has no
 * such key (its index range was lost at or before version). */
static PyObject *Engine_mark_absent(EngineObject *self, PyObject *args)
{
    return key_version_op(self, args, "OK:mark_absent", kv_eng_mark_absent, 0);
}

/* mark_lost(key, version) -> bool: a peer has key LOST at version (no
 * readable copy); enter it here as LOST at that version, with no record, so
 * reads raise KeyLostError until it is rebuilt. False when a copy at that
 * version or newer is here, or the key is longer than the inline limit. */
static PyObject *Engine_mark_lost(EngineObject *self, PyObject *args)
{
    return key_version_op(self, args, "OK:mark_lost", kv_eng_mark_lost, 1);
}

/* mark_range_lost(lo, hi, version) -> index pages newly flagged LOST. */
static PyObject *Engine_mark_range_lost(EngineObject *self, PyObject *args)
{
    unsigned long long lo, hi, version;
    if (!PyArg_ParseTuple(args, "KKK:mark_range_lost", &lo, &hi, &version)) return NULL;
    ENGINE_OK(self);
    if (version == 0 || version > KV_VERSION_MASK) {
        PyErr_SetString(PyExc_ValueError, "version must be between 1 and 2**48 - 1");
        return NULL;
    }
    if (lo > hi) {
        PyErr_SetString(PyExc_ValueError, "an empty hash range (lo > hi)");
        return NULL;
    }
    return PyLong_FromSize_t(kv_eng_mark_range_lost(&self->e, lo, hi, version));
}

/* range_done(lo, hi, version) -> index pages that are known again. */
static PyObject *Engine_range_done(EngineObject *self, PyObject *args)
{
    unsigned long long lo, hi, version;
    if (!PyArg_ParseTuple(args, "KKK:range_done", &lo, &hi, &version)) return NULL;
    ENGINE_OK(self);
    return PyLong_FromSize_t(kv_eng_range_done(&self->e, lo, hi, version));
}

static PyObject *Engine_scrub(EngineObject *self, PyObject *arg)
{
    ENGINE_OK(self);
    unsigned long long max = PyLong_AsUnsignedLongLong(arg);
    if (max == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    uint64_t found;
    uint64_t done = kv_eng_scrub(&self->e, max, &found);
    return Py_BuildValue("(KK)", (unsigned long long)done, (unsigned long long)found);
}

static PyObject *Engine_expire_sweep(EngineObject *self, PyObject *arg)
{
    ENGINE_OK(self);
    Py_ssize_t budget = PyLong_AsSsize_t(arg);
    if (budget == -1 && PyErr_Occurred()) return NULL;
    return PyLong_FromSize_t(kv_eng_expire_sweep(&self->e, budget > 0 ? (size_t)budget : 0, kv_now_ms()));
}

static PyObject *Engine_compact(EngineObject *self, PyObject *args)
{
    Py_ssize_t max = 4096;
    if (!PyArg_ParseTuple(args, "|n:compact", &max)) return NULL;
    ENGINE_OK(self);
    kv_eng_check(&self->e);
    return PyLong_FromSize_t(kv_eng_compact(&self->e, max > 0 ? (size_t)max : 0));
}

static PyObject *Engine_flush(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    if (kv_eng_flush(&self->e) != 0) {
        PyErr_SetString(self->st->StoreFullError, "no healthy memory left for an empty index");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* room() -> (free subpages, capacity in subpages): what a caller checks
 * before a multi-key write, without building the stats dict. */
static PyObject *Engine_room(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    return Py_BuildValue("(nn)", (Py_ssize_t)self->e.al.nfree, (Py_ssize_t)self->e.al.nsub);
}

static PyObject *Engine_engine_stats(EngineObject *self, PyObject *unused)
{
    ENGINE_OK(self);
    kv_eng_check(&self->e);
    kv_engine *e = &self->e;
    PyObject *d = PyDict_New();
    if (!d || arena_stats_into(e->arena, d)) goto fail;
#define U(x) PyLong_FromUnsignedLongLong((unsigned long long)(x))
    if (dset(d, "capacity", U(e->al.nsub * 4096ULL)) || dset(d, "used", U(e->al.live_bytes)) ||
        dset(d, "dead_bytes", U(e->al.dead_bytes)) || dset(d, "free_subpages", U(e->al.nfree)) ||
        dset(d, "quarantined_subpages", U(e->al.nlost)) || dset(d, "keys", U(e->nkeys)) ||
        dset(d, "lost_keys", U(e->n_lost)) || dset(d, "keys_lost_total", U(e->c_lost_keys)) ||
        dset(d, "rebuilt_keys", U(e->c_rebuilt)) || dset(d, "checksum_failures", U(e->c_checksum_fail)) ||
        dset(d, "faults_on_access", U(e->c_faults_on_read)) || dset(d, "expired_keys", U(e->c_expired)) ||
        dset(d, "keys_with_ttl", U(e->n_ttl)) || dset(d, "compactions", U(e->c_compactions)) ||
        dset(d, "records_moved", U(e->c_moved)) || dset(d, "scrubbed_bytes", U(e->c_scrubbed_bytes)) ||
        dset(d, "scrub_found", U(e->c_scrub_found)) || dset(d, "recoveries", U(e->c_recoveries)) ||
        dset(d, "index_bytes", U(kv_eng_index_bytes(e))) ||
        dset(d, "index_pages", U(e->al.nindex > e->dir_n ? e->al.nindex - e->dir_n : 0)) ||
        dset(d, "index_directory_bytes", U(e->dir_n * 4096ULL)) ||
        dset(d, "index_depth", U(e->gdepth)) || dset(d, "record_groups", U(1ULL << e->al.gbits)) || dset(d, "index_splits", U(e->c_splits)) || dset(d, "index_moves", U(e->c_moves)) ||
        dset(d, "index_pages_lost", U(e->c_index_pages_lost)) ||
        dset(d, "keys_lost_in_ranges", U(e->c_range_keys)) ||
        dset(d, "index_ranges_rebuilt", U(e->c_ranges_rebuilt)) ||
        dset(d, "index_directory_rebuilds", U(e->c_dir_rebuilds)) ||
        dset(d, "index_pages_scrubbed", U(e->c_index_scrubbed)) ||
        dset(d, "orphans_reclaimed", U(e->c_orphans)) ||
        dset(d, "records_bytes", U((e->al.nsub - e->al.nfree - e->al.nlost - e->al.nindex - e->al.nfixed) * 4096ULL)) ||
        dset(d, "generation", U(e->generation)) || dset(d, "unverified_subpages", U(e->verify_todo)) ||
        dset(d, "unvalidated_subpages", U(kv_lazy_pending(e))) ||
        dset(d, "adopt_records_validated", U(e->lazy ? e->lazy->records : e->lazy_records)) ||
        dset(d, "adopt_records_bad", U(e->lazy ? e->lazy->records_bad : e->lazy_records_bad)) ||
        dset(d, "adopt_validated_on_demand", U(e->lazy ? e->lazy->on_demand : e->lazy_on_demand)) ||
        dset(d, "allocator_bytes", U(e->meta_n ? kv_eng_meta_bytes(e) :
                                     e->al.nsub * (sizeof(kv_meta) + 3 * sizeof(uint32_t)) +
                                     (e->al.nsub + 63) / 64 * 8 + ((size_t)1 << e->al.gbits) * 12)) ||
        dset(d, "allocator_in_arena", PyBool_FromLong(e->meta_n != 0)) ||
        dset(d, "allocator_offset", U(e->meta_n ? e->meta_sub * 4096ULL : 0)) ||
        dset(d, "allocator_rebuilds", U(e->c_meta_rebuilds)) ||
        dset(d, "allocator_whole_index_lost", U(e->c_meta_all_lost)) ||
        dset(d, "version", U(e->version)) || dset(d, "max_key", PyLong_FromSsize_t(self->max_key)) ||
        dset(d, "max_value", PyLong_FromSsize_t(self->max_value)) ||
        dset(d, "last_salvage_error",
             e->last_salvage_error[0] ? PyUnicode_FromString(e->last_salvage_error) : Py_NewRef(Py_None)))
        goto fail;
#undef U
    return d;
fail:
    Py_XDECREF(d);
    return NULL;
}

static PyObject *Engine__corrupt(EngineObject *self, PyObject *args)
{
    PyObject *key;
    Py_ssize_t byte;
    if (!PyArg_ParseTuple(args, "On:_corrupt", &key, &byte)) return NULL;
    ENGINE_OK(self);
    kv_info info;
    int rc = lookup(self, key, &info, 0, 1);
    if (rc < 0) return NULL;
    if (rc != KV_OK) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    if (byte < 0 || (size_t)byte >= info.rec_len) {
        PyErr_Format(PyExc_IndexError, "byte %zd outside the %u-byte record", byte, info.rec_len);
        return NULL;
    }
    Py_buffer k;
    if (key_arg(self, key, &k)) return NULL;
    rc = kv_eng_corrupt(&self->e, k.buf, (uint32_t)k.len, (size_t)byte);
    put_bytes(&k);
    if (rc != KV_OK) return fault_error(self->st, "corrupt", 0);
    Py_RETURN_NONE;
}

/* resp_fast(buffer, flags, max_out=0) -> (consumed, replies, ncommands) */
static PyObject *Engine_resp_fast(EngineObject *self, PyObject *args)
{
    Py_buffer b;
    int flags = 0;
    Py_ssize_t max_out = 0;
    if (!PyArg_ParseTuple(args, "y*|in:resp_fast", &b, &flags, &max_out)) return NULL;
    if (max_out < 0) max_out = 0;
    if ((!self->ready || self->gen != g_fork_gen) && engine_unusable(self)) {
        PyBuffer_Release(&b);
        return NULL;
    }
    char *out = NULL;
    size_t outlen = 0, n = 0;
    size_t used = kv_resp_fast(&self->e, b.buf, (size_t)b.len, flags, (size_t)self->max_key,
                               (size_t)self->max_value, (size_t)max_out,
                               self->fast_slots_on ? self->fast_slots : NULL, &out, &outlen, &n);
    PyBuffer_Release(&b);
    PyObject *r = Py_BuildValue("(ny#n)", (Py_ssize_t)used, out ? out : "", (Py_ssize_t)outlen, (Py_ssize_t)n);
    free(out);
    return r;
}

/* set_fast_slots(bitmap | None): the hash slots resp_fast may serve (cluster
 * mode); None: no slot check (a server outside cluster mode). */
static PyObject *Engine_set_fast_slots(EngineObject *self, PyObject *arg)
{
    if (arg == Py_None) {
        self->fast_slots_on = 0;
        Py_RETURN_NONE;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    if (b.len != (Py_ssize_t)sizeof self->fast_slots) {
        PyErr_Format(PyExc_ValueError, "set_fast_slots wants %zu bytes (one bit per hash slot) or None, "
                     "not %zd bytes", sizeof self->fast_slots, b.len);
        PyBuffer_Release(&b);
        return NULL;
    }
    memcpy(self->fast_slots, b.buf, sizeof self->fast_slots);
    self->fast_slots_on = 1;
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyObject *Engine_get_fast_slots(EngineObject *self, void *c)
{
    if (!self->fast_slots_on) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)self->fast_slots, sizeof self->fast_slots);
}

static PyObject *Engine_close(EngineObject *self, PyObject *unused)
{
    /* another thread may be copying a lost hugepage with the GIL let go */
    while (self->ready && __atomic_load_n(&self->e.in_salvage, __ATOMIC_ACQUIRE)) {
        Py_BEGIN_ALLOW_THREADS
        usleep(1000);
        Py_END_ALLOW_THREADS
    }
    if (self->arena && self->ready) {
        ArenaObject *ao = self->arena;
        Py_INCREF(ao);
        engine_release(self);
        kv_arena_free(ao->a);
        ao->a = NULL;
        Py_DECREF(ao);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_get_closed(EngineObject *self, void *c) { return PyBool_FromLong(!self->ready); }
static PyObject *Engine_get_arena(EngineObject *self, void *c)
{
    return self->arena ? Py_NewRef((PyObject *)self->arena) : Py_NewRef(Py_None);
}
static PyObject *Engine_get_loss_fd(EngineObject *self, void *c)
{
    ENGINE_OK(self);
    return PyLong_FromLong(self->e.arena->efd);
}
static PyObject *Engine_get_version(EngineObject *self, void *c)
{
    ENGINE_OK(self);
    return PyLong_FromUnsignedLongLong(self->e.version);
}
static PyObject *Engine_get_salvaging(EngineObject *self, void *c)
{
    ENGINE_OK(self);
    return PyBool_FromLong(__atomic_load_n(&self->e.in_salvage, __ATOMIC_ACQUIRE));
}
static PyObject *Engine_get_losses_unprocessed(EngineObject *self, void *c)
{
    ENGINE_OK(self);
    return PyBool_FromLong(__atomic_load_n(&self->e.arena->pending_flag, __ATOMIC_ACQUIRE) != 0 ||
                           __atomic_load_n(&self->e.in_salvage, __ATOMIC_ACQUIRE));
}
static PyObject *Engine_get_loss_pending(EngineObject *self, void *c)
{
    ENGINE_OK(self);
    return PyBool_FromLong(__atomic_load_n(&self->e.arena->pending_flag, __ATOMIC_ACQUIRE) != 0 ||
                           self->e.lostq_n != 0 || self->e.lr_n != 0 ||
                           __atomic_load_n(&self->e.in_salvage, __ATOMIC_ACQUIRE));
}

static PyObject *Engine_adopt_report(EngineObject *self, PyObject *unused)
{
    if (!self->adopted) Py_RETURN_NONE;
    const kv_adopt_report *r = &self->adopt;
    return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsK}", "index_pages", (unsigned long long)r->index_pages,
                         "index_pages_bad", (unsigned long long)r->index_pages_bad, "keys",
                         (unsigned long long)r->keys, "records", (unsigned long long)r->records, "records_bad",
                         (unsigned long long)r->records_bad, "lost_keys", (unsigned long long)r->lost_keys,
                         "lost_ranges", (unsigned long long)r->lost_ranges, "generation",
                         (unsigned long long)r->generation, "version", (unsigned long long)r->old_version,
                         "layout", (unsigned long long)KV_LAYOUT_VERSION);
}

static PyMethodDef Engine_methods[] = {
    {"get", (PyCFunction)Engine_get, METH_O, "get(key) -> bytes or None; KeyLostError if the key was lost."},
    {"get_versioned", (PyCFunction)Engine_get_versioned, METH_O, "get_versioned(key) -> (version, value) or None."},
    {"touches_lost", (PyCFunction)Engine_touches_lost, METH_O,
     "touches_lost(key) -> bool: would a read of key now meet memory known lost (and so wait for "
     "the recovery)? Never waits, never processes losses."},
    {"put", (PyCFunction)(void (*)(void))Engine_put, METH_FASTCALL | METH_KEYWORDS,
     "put(key, value, ttl=None, *, expire_at_ms=None) -> version. ttl: seconds from now; expire_at_ms: absolute (ms since the epoch, 0 none, -1 keep the key's)."},
    {"put_versioned", (PyCFunction)Engine_put_versioned, METH_VARARGS,
     "put_versioned(key, value, version, expire_at_ms=0): apply a write with its version."},
    {"delete", (PyCFunction)Engine_delete, METH_O, "delete(key) -> True if the key existed (present or lost)."},
    {"exists", (PyCFunction)Engine_exists, METH_O, "exists(key) -> bool (a lost key exists)."},
    {"mget", (PyCFunction)Engine_mget, METH_VARARGS, "mget(keys, marker=None) -> [value or None]."},
    {"mput", (PyCFunction)Engine_mput, METH_O, "mput(mapping or pairs) -> [version]."},
    {"expire_at_ms", (PyCFunction)Engine_expire_at_ms, METH_VARARGS,
     "expire_at_ms(key, ms, version=0) -> bool: set (ms>0, absolute) or clear (0) the expiry; a change takes a version."},
    {"ttl_ms", (PyCFunction)Engine_ttl_ms, METH_O, "ttl_ms(key) -> ms left, -1 (no expiry), -2 (absent)."},
    {"expire_at", (PyCFunction)Engine_expire_at, METH_O, "expire_at(key) -> absolute expiry in ms, 0 if none."},
    {"keys", (PyCFunction)Engine_keys, METH_NOARGS, "keys() -> list of keys (present and lost)."},
    {"keys_since", (PyCFunction)Engine_keys_since, METH_O,
     "keys_since(version) -> keys (present and lost) whose version is above version."},
    {"locate", (PyCFunction)Engine_locate, METH_O, "locate(key) -> (arena offset, record length)."},
    {"recover", (PyCFunction)Engine_recover, METH_NOARGS,
     "recover() -> dict: process lost memory now (salvage, invalidate, quarantine)."},
    {"take_lost", (PyCFunction)Engine_take_lost, METH_VARARGS,
     "take_lost(max=0, mark=None) -> [(key, version)] newly lost."},
    {"set_state", (PyCFunction)Engine_set_state, METH_VARARGS, "set_state(key, state) -> bool."},
    {"lost_keys", (PyCFunction)Engine_lost_keys, METH_NOARGS, "lost_keys() -> [(key, version, state)]."},
    {"state", (PyCFunction)Engine_state, METH_O,
     "state(key) -> 'absent', 'present', 'lost', 'rebuilding' or 'unrecoverable'."},
    {"install", (PyCFunction)(void (*)(void))Engine_install, METH_VARARGS | METH_KEYWORDS,
     "install(key, value, version, expire_at_ms=0, from_range=0) -> 'installed' | 'stale' | 'skipped'."},
    {"mark_absent", (PyCFunction)Engine_mark_absent, METH_VARARGS,
     "mark_absent(key, version) -> bool: in a lost index range, a source caught up to version lacks key."},
    {"mark_lost", (PyCFunction)Engine_mark_lost, METH_VARARGS,
     "mark_lost(key, version) -> bool: enter key as LOST at version (a peer's lost key), no record."},
    {"mark_range_lost", (PyCFunction)Engine_mark_range_lost, METH_VARARGS,
     "mark_range_lost(lo, hi, version) -> pages: flag the index pages covering [lo, hi] LOST at version."},
    {"range_done", (PyCFunction)Engine_range_done, METH_VARARGS,
     "range_done(lo, hi, version) -> pages: the lost index range [lo, hi] was rebuilt at version."},
    {"take_lost_ranges", (PyCFunction)Engine_take_lost_ranges, METH_NOARGS,
     "take_lost_ranges() -> [(lo, hi, version)] newly lost index ranges (hi inclusive)."},
    {"lost_ranges", (PyCFunction)Engine_lost_ranges, METH_NOARGS,
     "lost_ranges() -> [(lo, hi, version)] index ranges not known now (hi inclusive)."},
    {"scan_range", (PyCFunction)Engine_scan_range, METH_VARARGS,
     "scan_range(lo, hi) -> [('key', key, version, state) | ('range', lo, hi, version)]."},
    {"subpage_kind", (PyCFunction)Engine_subpage_kind, METH_O,
     "subpage_kind(s) -> (kind, lo, hi): what subpage s holds; an index page's hash range."},
    {"locate_allocator", (PyCFunction)Engine_locate_allocator, METH_NOARGS,
     "locate_allocator() -> (arena offset, length) of the allocator's metadata region, or None."},
    {"locate_entry", (PyCFunction)Engine_locate_entry, METH_O,
     "locate_entry(key) -> (arena offset, length) of the key's index entry."},
    {"scrub", (PyCFunction)Engine_scrub, METH_O, "scrub(max_bytes) -> (bytes examined, records failed)."},
    {"expire_sweep", (PyCFunction)Engine_expire_sweep, METH_O, "expire_sweep(budget) -> keys expired."},
    {"compact", (PyCFunction)Engine_compact, METH_VARARGS, "compact(max_subpages=4096) -> records moved."},
    {"flush", (PyCFunction)Engine_flush, METH_NOARGS, "Delete every key."},
    {"engine_stats", (PyCFunction)Engine_engine_stats, METH_NOARGS, "Counters of the engine and its arena."},
    {"room", (PyCFunction)Engine_room, METH_NOARGS,
     "room() -> (free_subpages, capacity_subpages), without building the stats."},
    {"adopt_report", (PyCFunction)Engine_adopt_report, METH_NOARGS,
     "What adoption found (a dict), or None when this engine formatted a fresh arena."},
    {"_corrupt", (PyCFunction)Engine__corrupt, METH_VARARGS, "Test hook: flip one byte of a key's record."},
    {"resp_fast", (PyCFunction)Engine_resp_fast, METH_VARARGS,
     "resp_fast(buffer, flags=0, max_out=0) -> (consumed, replies, n): run leading plain RESP "
     "GET/SET in C, stopping once the replies hold max_out bytes (0: no limit)."},
    {"set_fast_slots", (PyCFunction)Engine_set_fast_slots, METH_O,
     "set_fast_slots(bitmap | None): cluster mode, the hash slots resp_fast may serve (2048 bytes, "
     "bit s = byte s // 8, bit s % 8; any other key stops it); None: no slot check."},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "Free the index and unmap the arena (idempotent)."},
    {NULL}};

static PyObject *Engine_get_salvage(EngineObject *self, void *c)
{
    ENGINE_OK(self);
    return PyBool_FromLong(self->e.salvage);
}
static int Engine_set_salvage(EngineObject *self, PyObject *v, void *c)
{
    if ((!self->ready || self->gen != g_fork_gen) && engine_unusable(self)) return -1;
    int b = v ? PyObject_IsTrue(v) : 0;
    if (b < 0) return -1;
    self->e.salvage = b;
    return 0;
}

static PyObject *Engine_get_recovery_thread(EngineObject *self, void *c)
{
    ENGINE_OK(self);
    return PyLong_FromUnsignedLong(__atomic_load_n(&self->e.recover_owner, __ATOMIC_ACQUIRE));
}
static int Engine_set_recovery_thread(EngineObject *self, PyObject *v, void *c)
{
    if ((!self->ready || self->gen != g_fork_gen) && engine_unusable(self)) return -1;
    unsigned long t = 0;
    if (v && v != Py_None) {
        t = PyLong_AsUnsignedLong(v);
        if (t == (unsigned long)-1 && PyErr_Occurred()) return -1;
    }
    __atomic_store_n(&self->e.recover_owner, t, __ATOMIC_RELEASE);
    return 0;
}

static PyGetSetDef Engine_getset[] = {
    {"recovery_thread", (getter)Engine_get_recovery_thread, (setter)Engine_set_recovery_thread,
     "0 (any thread processes losses), or the threading.get_ident() of the one thread that does: "
     "recover() elsewhere processes nothing, and an operation elsewhere that meets lost memory "
     "waits (GIL released) until that thread has processed it.", NULL},
    {"salvage", (getter)Engine_get_salvage, (setter)Engine_set_salvage,
     "Mainline policy: copy a whole lost hugepage into a spare one (default True).", NULL},
    {"closed", (getter)Engine_get_closed, NULL, "True once closed.", NULL},
    {"fast_slots", (getter)Engine_get_fast_slots, NULL,
     "The bitmap set by set_fast_slots (bytes), or None when resp_fast checks no slots.", NULL},
    {"arena", (getter)Engine_get_arena, NULL, "The Arena.", NULL},
    {"loss_fd", (getter)Engine_get_loss_fd, NULL, "eventfd readable when memory was lost.", NULL},
    {"version", (getter)Engine_get_version, NULL, "Last version handed out.", NULL},
    {"loss_pending", (getter)Engine_get_loss_pending, NULL,
     "True while losses await processing (a salvage copy in progress included).", NULL},
    {"losses_unprocessed", (getter)Engine_get_losses_unprocessed, NULL,
     "True while lost memory awaits the engine's processing (a salvage copy included): a read "
     "that meets it waits (see touches_lost).", NULL},
    {"salvaging", (getter)Engine_get_salvaging, NULL,
     "True while a lost hugepage is being copied (other threads keep running).", NULL},
    {NULL}};

static PyMemberDef Engine_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(EngineObject, dict), READONLY, NULL},
    {"__weaklistoffset__", T_PYSSIZET, offsetof(EngineObject, weakrefs), READONLY, NULL},
    {NULL}};

static PyType_Slot Engine_slots[] = {
    {Py_tp_new, Engine_new},
    {Py_tp_init, Engine_init},
    {Py_tp_dealloc, Engine_dealloc},
    {Py_tp_traverse, Engine_traverse},
    {Py_tp_clear, Engine_clear},
    {Py_tp_methods, Engine_methods},
    {Py_tp_getset, Engine_getset},
    {Py_tp_members, Engine_members},
    {Py_sq_contains, Engine_contains},
    {Py_sq_length, Engine_len},
    {Py_mp_length, Engine_len},
    {Py_tp_doc, "Engine(arena, capacity=-1, max_key=65536, max_value=512MiB)\n\n"
                "The record store on an Arena. kvstore.Store subclasses it."},
    {0, NULL}};

static PyType_Spec Engine_spec = {"kvstore._native.Engine", sizeof(EngineObject), 0,
                                  Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, Engine_slots};

/* --------------------------------------------------------- module funcs */

static PyObject *mod_xxh64(PyObject *m, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"data", "seed", NULL};
    PyObject *data;
    unsigned long long seed = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O|K:xxh64", kwlist, &data, &seed)) return NULL;
    Py_buffer v;
    if (get_bytes(data, &v, "data")) return NULL;
    uint64_t h = kv_xxh64(v.buf, (size_t)v.len, seed);
    put_bytes(&v);
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *mod_key_hash(PyObject *m, PyObject *arg)
{
    Py_buffer v;
    if (get_bytes(arg, &v, "key")) return NULL;
    uint64_t h = kv_hash(v.buf, (size_t)v.len);
    put_bytes(&v);
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *mod_probe(PyObject *m, PyObject *unused)
{
    return Py_BuildValue("{s:O,s:O,s:O}", "keep_ue", kv_probe_keep_ue() ? Py_True : Py_False, "hwpoison",
                         kv_probe_hwpoison() ? Py_True : Py_False, "handler_installed",
                         kv_guard_is_installed() ? Py_True : Py_False);
}

static PyObject *mod_handler_installed(PyObject *m, PyObject *unused)
{
    return PyBool_FromLong(kv_guard_is_installed());
}

static PyObject *mod_install_handler(PyObject *m, PyObject *unused)
{
    if (kv_guard_install() != 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *mod_signal_counts(PyObject *m, PyObject *unused)
{
    kv_sigcounts c;
    kv_guard_counts(&c);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "ao", (unsigned long long)c.ao, "ar",
                         (unsigned long long)c.ar, "adrerr", (unsigned long long)c.adrerr, "other",
                         (unsigned long long)c.other, "chained", (unsigned long long)c.chained, "in_injection",
                         (unsigned long long)c.in_injection);
}

static PyObject *mod_raw_load(PyObject *m, PyObject *arg)
{
    void *p = PyLong_AsVoidPtr(arg);
    if (!p && PyErr_Occurred()) return NULL;
    return PyLong_FromLong(kv_guard_raw_load((uintptr_t)p));
}

static PyObject *mod_record_checksum(PyObject *m, PyObject *args)
{
    Py_buffer k, v;
    unsigned long long version;
    PyObject *ko, *vo;
    if (!PyArg_ParseTuple(args, "OOK:record_checksum", &ko, &vo, &version)) return NULL;
    if (get_bytes(ko, &k, "key")) return NULL;
    if (get_bytes(vo, &v, "value")) {
        put_bytes(&k);
        return NULL;
    }
    kv_xxh64_state st;
    uint8_t le[4] = {(uint8_t)v.len, (uint8_t)(v.len >> 8), (uint8_t)(v.len >> 16), (uint8_t)(v.len >> 24)};
    kv_xxh64_reset(&st, version);
    kv_xxh64_update(&st, k.buf, (size_t)k.len);
    kv_xxh64_update(&st, le, 4);
    kv_xxh64_update(&st, v.buf, (size_t)v.len);
    put_bytes(&k);
    put_bytes(&v);
    return PyLong_FromUnsignedLong((uint32_t)kv_xxh64_digest(&st));
}

static PyObject *mod_key_slot(PyObject *m, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    unsigned slot = kv_key_slot(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(slot);
}

static PyMethodDef mod_methods[] = {
    {"key_slot", mod_key_slot, METH_O,
     "key_slot(key) -> the Redis Cluster hash slot resp_fast computes (same as kvstore.slots.key_slot)."},
    {"xxh64", (PyCFunction)(void (*)(void))mod_xxh64, METH_VARARGS | METH_KEYWORDS,
     "xxh64(data, seed=0) -> int: XXH64 digest (same as xxhash.xxh64_intdigest)."},
    {"key_hash", mod_key_hash, METH_O,
     "key_hash(key) -> the 64-bit hash the store places keys by (XXH64, seed 0x6b7673746f7265)."},
    {"probe", mod_probe, METH_NOARGS, "What the kernel supports: keep_ue, hwpoison; and handler state."},
    {"handler_installed", mod_handler_installed, METH_NOARGS, "True if our SIGBUS handler is installed."},
    {"install_handler", mod_install_handler, METH_NOARGS, "(Re)install our SIGBUS handler on top."},
    {"signal_counts", mod_signal_counts, METH_NOARGS, "SIGBUS signals seen by our handler, by kind."},
    {"_raw_load", mod_raw_load, METH_O, "Test hook: load a byte from an address with no guard."},
    {"record_checksum", mod_record_checksum, METH_VARARGS,
     "record_checksum(key, value, version) -> the u32 stored in a record header."},
    {NULL}};

static int mod_exec(PyObject *m)
{
    modstate *st = PyModule_GetState(m);
    PyObject *errors = PyImport_ImportModule("kvstore.errors");
    if (!errors) return -1;
#define EXC(name)                                                 \
    if (!(st->name = PyObject_GetAttrString(errors, #name))) {    \
        Py_DECREF(errors);                                        \
        return -1;                                                \
    }
    EXC(Error) EXC(KeyLostError) EXC(UnrecoverableKeyError) EXC(StoreFullError) EXC(KeyTooLargeError)
    EXC(ValueTooLargeError) EXC(ClosedError) EXC(ArenaError) EXC(MemoryFaultError) EXC(FaultInjectionError)
#undef EXC
    Py_DECREF(errors);
    if (!(st->str_lost_read = PyUnicode_InternFromString("_lost_read"))) return -1;
    if (!(st->ArenaType = PyType_FromModuleAndSpec(m, &Arena_spec, NULL))) return -1;
    if (PyModule_AddObjectRef(m, "Arena", st->ArenaType) < 0) return -1;
    if (!(st->EngineType = PyType_FromModuleAndSpec(m, &Engine_spec, NULL))) return -1;
    if (PyModule_AddObjectRef(m, "Engine", st->EngineType) < 0) return -1;
    if (PyModule_AddIntConstant(m, "SUBPAGE", 4096) < 0) return -1;
    if (PyModule_AddIntConstant(m, "RECORD_HEADER", KV_REC_HDR) < 0) return -1;
    if (PyModule_AddIntConstant(m, "MAX_KEY", KV_MAX_KEY) < 0) return -1;
    if (PyModule_AddIntConstant(m, "RESP_ALLOW_SET", KV_RESP_ALLOW_SET) < 0) return -1;
    if (PyModule_AddIntConstant(m, "RESP_RESP3", KV_RESP_RESP3) < 0) return -1;
    if (PyModule_AddIntConstant(m, "SLOTS", KV_SLOTS) < 0) return -1;
    if (PyModule_AddIntConstant(m, "MFD_MF_KEEP_UE_MAPPED", MFD_MF_KEEP_UE_MAPPED) < 0) return -1;
    static int atfork_done;
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, on_fork_child);
        atfork_done = 1;
    }
    if (kv_guard_install() != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static int mod_traverse(PyObject *m, visitproc visit, void *arg)
{
    modstate *st = PyModule_GetState(m);
    Py_VISIT(st->ArenaType);
    Py_VISIT(st->EngineType);
    return 0;
}

static int mod_clear(PyObject *m)
{
    modstate *st = PyModule_GetState(m);
    Py_CLEAR(st->ArenaType);
    Py_CLEAR(st->EngineType);
    Py_CLEAR(st->Error);
    Py_CLEAR(st->KeyLostError);
    Py_CLEAR(st->UnrecoverableKeyError);
    Py_CLEAR(st->StoreFullError);
    Py_CLEAR(st->KeyTooLargeError);
    Py_CLEAR(st->ValueTooLargeError);
    Py_CLEAR(st->ClosedError);
    Py_CLEAR(st->ArenaError);
    Py_CLEAR(st->MemoryFaultError);
    Py_CLEAR(st->FaultInjectionError);
    Py_CLEAR(st->str_lost_read);
    return 0;
}

static PyModuleDef_Slot mod_slots[] = {{Py_mod_exec, mod_exec}, {0, NULL}};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "kvstore._native",
    "The C core of kvstore: arena, SIGBUS guard, index, allocator, checksums.", sizeof(modstate), mod_methods,
    mod_slots, mod_traverse, mod_clear, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModuleDef_Init(&moddef); }
