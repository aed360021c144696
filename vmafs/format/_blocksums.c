/* vmafs.format._blocksums: the block sums and index checks of vmafs's archive format
 * (vmafs/format/index.py says what they are), computed with the GIL released.
 *
 * An optional accelerator: index.py computes the same values in Python when this module is not
 * built, and tests/test_block_sums.py proves the two equal. Hashing is the system's xxHash
 * (libxxhash-dev), inlined: XXH3-64, low 32 bits.
 *
 * Any buffer is accepted: a C-contiguous one is hashed where it is, any other is copied into
 * C order first (what memoryview.tobytes() gives), as index.py's fallback does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define BLOCK 4096
#define SUM_SIZE 4

/* A buffer's bytes in C order: a view of it, or a copy when it is not C-contiguous. */
typedef struct {
    Py_buffer view;
    char *copy;
    const unsigned char *buf;
    Py_ssize_t len;
} Bytes;

static int bytes_get(PyObject *obj, Bytes *b)
{
    b->copy = NULL;
    if (PyObject_GetBuffer(obj, &b->view, PyBUF_FULL_RO) < 0)
        return -1;
    b->len = b->view.len;
    if (PyBuffer_IsContiguous(&b->view, 'C')) {
        b->buf = b->view.buf;
        return 0;
    }
    b->copy = PyMem_Malloc(b->len ? (size_t)b->len : 1);
    if (b->copy == NULL) {
        PyBuffer_Release(&b->view);
        PyErr_NoMemory();
        return -1;
    }
    if (PyBuffer_ToContiguous(b->copy, &b->view, b->len, 'C') < 0) {
        PyMem_Free(b->copy);
        PyBuffer_Release(&b->view);
        return -1;
    }
    b->buf = (const unsigned char *)b->copy;
    return 0;
}

static void bytes_release(Bytes *b)
{
    PyMem_Free(b->copy);
    PyBuffer_Release(&b->view);
}

static inline uint32_t sum32(const void *data, size_t len)
{
    return (uint32_t)XXH3_64bits(data, len);
}

static inline void put_le32(unsigned char *out, uint32_t v)
{
    out[0] = (unsigned char)v;
    out[1] = (unsigned char)(v >> 8);
    out[2] = (unsigned char)(v >> 16);
    out[3] = (unsigned char)(v >> 24);
}

static inline Py_ssize_t blocks_of(Py_ssize_t len)
{
    return len / BLOCK + (len % BLOCK != 0);
}

/* The LE u32 sums of data's 4 KiB blocks (a short last block summed as it is) into out. */
static void sum_blocks(const unsigned char *data, Py_ssize_t len, unsigned char *out)
{
    for (Py_ssize_t at = 0; at < len; at += BLOCK, out += SUM_SIZE) {
        Py_ssize_t n = len - at < BLOCK ? len - at : BLOCK;
        put_le32(out, sum32(data + at, (size_t)n));
    }
}

PyDoc_STRVAR(block_sums_doc,
"block_sums(*parts) -> bytes\n\n"
"The sums (LE u32: low 32 bits of XXH3-64) of the 4 KiB blocks of each part, in order;\n"
"a part's short last block is summed as it is. The GIL is released while hashing.");

static PyObject *block_sums(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    Bytes small[8];
    Bytes *parts = nargs <= 8 ? small : PyMem_Calloc((size_t)nargs, sizeof(Bytes));
    PyObject *out = NULL;
    Py_ssize_t got = 0, blocks = 0;
    if (parts == NULL)
        return PyErr_NoMemory();
    for (; got < nargs; got++) {
        if (bytes_get(args[got], &parts[got]) < 0)
            goto done;
        blocks += blocks_of(parts[got].len);
    }
    out = PyBytes_FromStringAndSize(NULL, blocks * SUM_SIZE);
    if (out == NULL)
        goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < nargs; i++) {
        sum_blocks(parts[i].buf, parts[i].len, dst);
        dst += blocks_of(parts[i].len) * SUM_SIZE;
    }
    Py_END_ALLOW_THREADS
done:
    while (got > 0)
        bytes_release(&parts[--got]);
    if (parts != small)
        PyMem_Free(parts);
    return out;
}

PyDoc_STRVAR(checks_doc,
"checks(data, ends, summed=False) -> bytes\n\n"
"The index check (LE u32) of each piece of data, pieces back to back from offset 0, the\n"
"i-th ending at ends[i] (non-decreasing, at most len(data)): the checksum of its bytes, or\n"
"with summed, the checksum of its block sums. The GIL is released while hashing.");

static PyObject *checks(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *names[] = {"data", "ends", "summed", NULL};
    PyObject *data_obj, *ends_obj, *seq = NULL, *out = NULL;
    int summed = 0;
    Py_ssize_t *ends = NULL, longest = 0, start = 0;
    unsigned char *scratch = NULL;
    Bytes data;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|p:checks", names, &data_obj, &ends_obj,
                                     &summed))
        return NULL;
    if (bytes_get(data_obj, &data) < 0)
        return NULL;
    seq = PySequence_Fast(ends_obj, "ends must be a sequence of integers");
    if (seq == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    ends = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
    if (ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t end = PyNumber_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i), PyExc_OverflowError);
        if (end == -1 && PyErr_Occurred())
            goto done;
        if (end < start || end > data.len) {
            PyErr_SetString(PyExc_ValueError, "ends must be non-decreasing and within the data");
            goto done;
        }
        if (end - start > longest)
            longest = end - start;
        ends[i] = start = end;
    }
    if (summed) {
        scratch = PyMem_Malloc((size_t)(blocks_of(longest) ? blocks_of(longest) : 1) * SUM_SIZE);
        if (scratch == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, n * SUM_SIZE);
    if (out == NULL)
        goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    Py_BEGIN_ALLOW_THREADS
    start = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t len = ends[i] - start;
        const unsigned char *piece = data.buf + start;
        if (summed) {
            sum_blocks(piece, len, scratch);
            put_le32(dst + i * SUM_SIZE, sum32(scratch, (size_t)(blocks_of(len) * SUM_SIZE)));
        } else {
            put_le32(dst + i * SUM_SIZE, sum32(piece, (size_t)len));
        }
        start = ends[i];
    }
    Py_END_ALLOW_THREADS
done:
    PyMem_Free(scratch);
    PyMem_Free(ends);
    Py_XDECREF(seq);
    bytes_release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"block_sums", (PyCFunction)(void (*)(void))block_sums, METH_FASTCALL, block_sums_doc},
    {"checks", (PyCFunction)(void (*)(void))checks, METH_VARARGS | METH_KEYWORDS, checks_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmafs.format._blocksums",
    "vmafs's block sums and index checks with the GIL released (see vmafs/format/index.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blocksums(void)
{
    return PyModule_Create(&module);
}
