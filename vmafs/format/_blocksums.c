/* vmafs.format._blocksums: the block sums and index checks of vmafs's archive format
 * (vmafs/format/index.py says what they are), computed with the GIL released.
 *
 * An optional accelerator: index.py computes the same values in Python when this module is not
 * built, and tests/test_block_sums.py proves the two equal. Hashing is the system's xxHash
 * (libxxhash-dev), inlined: XXH3-64, low 32 bits.
 *
 * Any buffer is accepted: a C-contiguous one is hashed where it is, any other is copied into
 * C order first (what memoryview.tobytes() gives), as index.py's fallback does.
 *
 * Also the forward walk's per-extent header work (vma.check_extent_headers, vma.used_slots:
 * a run of extent headers checked, md5 included, in one call; an extent's used slots), so
 * that the walk's reader thread runs a few Python steps an extent; vma.py has the same in
 * numpy and hashlib, and tests/test_vma_codec.py proves them equal.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define BLOCK 4096
#define SUM_SIZE 4
/* checks() of less data keeps the GIL: hashing it takes less than handing the GIL to another
 * thread and waiting to get it back (a data extent's carried sums, 4 KiB, ~0.2 us) */
#define GIL_FREE_FROM (64 * 1024)

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

static Py_ssize_t *ends_checked(Py_ssize_t *ends, Py_ssize_t n, Py_ssize_t len,
                                Py_ssize_t *longest);

/* ends (a sequence of ints, non-decreasing, each at most len) into a new C array; *longest:
 * the longest piece. NULL with an exception set on bad input. A C-contiguous buffer of int64
 * (a numpy array, as the walk passes) is copied as it is, not item by item as objects. */
static Py_ssize_t *ends_get(PyObject *obj, Py_ssize_t len, Py_ssize_t *count, Py_ssize_t *longest)
{
    if (PyObject_CheckBuffer(obj)) {
        Py_buffer view;
        if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
            const char *f = view.format;
            if (view.itemsize == 8 && f != NULL && (f[0] == '=' || f[0] == '@'
                                                    || (PY_LITTLE_ENDIAN && f[0] == '<'))
                    && f[1] != '\0')
                f++;
            if (view.itemsize == 8 && f != NULL && (f[0] == 'q' || f[0] == 'l') && f[1] == '\0') {
                Py_ssize_t n = view.len / 8;
                Py_ssize_t *ends = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
                if (ends == NULL) {
                    PyBuffer_Release(&view);
                    PyErr_NoMemory();
                    return NULL;
                }
                memcpy(ends, view.buf, (size_t)n * sizeof(Py_ssize_t));
                PyBuffer_Release(&view);
                *count = n;
                return ends_checked(ends, n, len, longest);
            }
            PyBuffer_Release(&view);
        } else {
            PyErr_Clear();  /* not such a buffer: a sequence, item by item */
        }
    }
    PyObject *seq = PySequence_Fast(obj, "ends must be a sequence of integers");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), start = 0;
    Py_ssize_t *ends = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(Py_ssize_t));
    if (ends == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    *longest = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t end = PyNumber_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i), PyExc_OverflowError);
        if (end == -1 && PyErr_Occurred())
            goto fail;
        if (end < start || end > len) {
            PyErr_SetString(PyExc_ValueError, "ends must be non-decreasing and within the data");
            goto fail;
        }
        if (end - start > *longest)
            *longest = end - start;
        ends[i] = start = end;
    }
    Py_DECREF(seq);
    *count = n;
    return ends;
fail:
    PyMem_Free(ends);
    Py_DECREF(seq);
    return NULL;
}

/* The checks of clusters [first, stop) of data (cluster i ends at ends[i], the one before
 * first at `start`) into out (LE u32 each), plain or summed (scratch: room for the longest
 * cluster's sums). Runs without the GIL. */
static void checks_into(const unsigned char *data, const Py_ssize_t *ends, Py_ssize_t first,
                        Py_ssize_t stop, Py_ssize_t start, int summed, unsigned char *scratch,
                        unsigned char *out)
{
    for (Py_ssize_t i = first; i < stop; i++) {
        Py_ssize_t len = ends[i] - start;
        const unsigned char *piece = data + start;
        if (summed) {
            sum_blocks(piece, len, scratch);
            put_le32(out + i * SUM_SIZE, sum32(scratch, (size_t)(blocks_of(len) * SUM_SIZE)));
        } else {
            put_le32(out + i * SUM_SIZE, sum32(piece, (size_t)len));
        }
        start = ends[i];
    }
}

/* ends (n of them), checked as ends_get checks them; freed (NULL, exception set) if bad. */
static Py_ssize_t *ends_checked(Py_ssize_t *ends, Py_ssize_t n, Py_ssize_t len,
                                Py_ssize_t *longest)
{
    Py_ssize_t start = 0;
    *longest = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ends[i] < start || ends[i] > len) {
            PyMem_Free(ends);
            PyErr_SetString(PyExc_ValueError, "ends must be non-decreasing and within the data");
            return NULL;
        }
        if (ends[i] - start > *longest)
            *longest = ends[i] - start;
        start = ends[i];
    }
    return ends;
}

static unsigned char *scratch_for(Py_ssize_t longest)
{
    Py_ssize_t blocks = blocks_of(longest);
    unsigned char *scratch = PyMem_Malloc((size_t)(blocks ? blocks : 1) * SUM_SIZE);
    if (scratch == NULL)
        PyErr_NoMemory();
    return scratch;
}

PyDoc_STRVAR(checks_doc,
"checks(data, ends, summed=False) -> bytes\n\n"
"The index check (LE u32) of each piece of data, pieces back to back from offset 0, the\n"
"i-th ending at ends[i] (non-decreasing, at most len(data)): the checksum of its bytes, or\n"
"with summed, the checksum of its block sums. The GIL is released while hashing 64 KiB\n"
"or more.");

static PyObject *checks(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *names[] = {"data", "ends", "summed", NULL};
    PyObject *data_obj, *ends_obj, *out = NULL;
    int summed = 0;
    Py_ssize_t *ends = NULL, n = 0, longest = 0;
    unsigned char *scratch = NULL;
    Bytes data;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|p:checks", names, &data_obj, &ends_obj,
                                     &summed))
        return NULL;
    if (bytes_get(data_obj, &data) < 0)
        return NULL;
    ends = ends_get(ends_obj, data.len, &n, &longest);
    if (ends == NULL)
        goto done;
    if (summed && (scratch = scratch_for(longest)) == NULL)
        goto done;
    out = PyBytes_FromStringAndSize(NULL, n * SUM_SIZE);
    if (out == NULL)
        goto done;
    unsigned char *dst = (unsigned char *)PyBytes_AS_STRING(out);
    if (data.len < GIL_FREE_FROM) {
        checks_into(data.buf, ends, 0, n, 0, summed, scratch, dst);
    } else {
        Py_BEGIN_ALLOW_THREADS
        checks_into(data.buf, ends, 0, n, 0, summed, scratch, dst);
        Py_END_ALLOW_THREADS
    }
done:
    PyMem_Free(scratch);
    PyMem_Free(ends);
    bytes_release(&data);
    return out;
}

/* A writable, C-contiguous buffer of at least `need` bytes, or None (view->buf NULL). */
static int out_get(PyObject *obj, Py_buffer *view, Py_ssize_t need)
{
    view->buf = NULL;
    view->obj = NULL;
    if (obj == Py_None)
        return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len < need) {
        PyBuffer_Release(view);
        view->buf = NULL;
        PyErr_SetString(PyExc_ValueError, "an output buffer is too small");
        return -1;
    }
    return 0;
}

/* A C-contiguous array of int64 (numpy int64), as Py_ssize_t: *count items. */
static int int64s_get(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t *count)
{
    if (PyObject_GetBuffer(obj, view, (writable ? PyBUF_WRITABLE : 0) | PyBUF_C_CONTIGUOUS
                           | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || view->format == NULL || strchr("qlQL", view->format[0]) == NULL
            || view->format[1] != '\0') {
        PyBuffer_Release(view);
        view->obj = NULL;
        PyErr_SetString(PyExc_TypeError, "an array of int64 is needed");
        return -1;
    }
    *count = view->len / 8;
    return 0;
}

_Static_assert(sizeof(Py_ssize_t) == sizeof(int64_t), "read_pieces needs a 64-bit Py_ssize_t");

PyDoc_STRVAR(read_pieces_doc,
"read_pieces(fd, buffer, offset, ends, bounds, state, data_out, summed_out) -> int\n\n"
"Read an extent's data into buffer (file descriptor fd, from offset) piece by piece, and\n"
"hash each piece's clusters right after its read (while it is in this core's cache), all\n"
"with the GIL released; return how many pieces this call did. Several threads may call it\n"
"at once on the same state: each piece is taken once.\n"
"ends (int64): where each cluster ends in buffer; bounds (int64): the pieces, as cluster\n"
"indices (piece k is clusters bounds[k] to bounds[k+1]); state (int64, 1 + 2 a piece): the\n"
"next piece to take, then per piece the bytes read and the error that stopped its reading\n"
"(errno, 0: none; a short read is the end of the file). data_out, summed_out: writable,\n"
"LE u32 a cluster, or None (not wanted): the checks of a wholly read piece's clusters, as\n"
"checks(buffer, ends) and checks(buffer, ends, summed=True) give them.");

static PyObject *read_pieces(PyObject *self, PyObject *args)
{
    (void)self;
    int fd;
    long long offset;
    PyObject *buf_obj, *ends_obj, *bounds_obj, *state_obj, *data_obj, *summed_obj;
    PyObject *out = NULL;
    Py_buffer buf = {0}, ends_v = {0}, bounds_v = {0}, state_v = {0}, data_out = {0},
              summed_out = {0};
    Py_ssize_t n = 0, nb = 0, ns = 0, longest = 0, done = 0;
    unsigned char *scratch = NULL;
    if (!PyArg_ParseTuple(args, "iOLOOOOO:read_pieces", &fd, &buf_obj, &offset, &ends_obj,
                          &bounds_obj, &state_obj, &data_obj, &summed_obj))
        return NULL;
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "negative offset");
        return NULL;
    }
    if (PyObject_GetBuffer(buf_obj, &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (int64s_get(ends_obj, &ends_v, 0, &n) < 0 || int64s_get(bounds_obj, &bounds_v, 0, &nb) < 0
            || int64s_get(state_obj, &state_v, 1, &ns) < 0)
        goto done;
    const Py_ssize_t *ends = ends_v.buf, *bounds = bounds_v.buf;
    Py_ssize_t *state = state_v.buf;
    Py_ssize_t pieces = nb - 1, start = 0;
    if (nb < 1 || ns < 1 + 2 * pieces || bounds[0] != 0 || bounds[pieces] != n) {
        PyErr_SetString(PyExc_ValueError, "bounds must go from 0 to len(ends), state must have "
                        "room for every piece");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (ends[i] < start || ends[i] > buf.len) {
            PyErr_SetString(PyExc_ValueError, "ends must be non-decreasing and within the data");
            goto done;
        }
        if (ends[i] - start > longest)
            longest = ends[i] - start;
        start = ends[i];
    }
    for (Py_ssize_t k = 0; k < pieces; k++) {
        if (bounds[k + 1] <= bounds[k]) {
            PyErr_SetString(PyExc_ValueError, "bounds must be increasing");
            goto done;
        }
    }
    if (out_get(data_obj, &data_out, n * SUM_SIZE) < 0
            || out_get(summed_obj, &summed_out, n * SUM_SIZE) < 0)
        goto done;
    if (summed_out.buf != NULL && (scratch = scratch_for(longest)) == NULL)
        goto done;
    if (__atomic_load_n(&state[0], __ATOMIC_ACQUIRE) >= pieces) {
        /* every piece taken (by the other thread): no GIL hand-off for nothing */
        out = PyLong_FromSsize_t(0);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (;;) {
        Py_ssize_t k = __atomic_fetch_add(&state[0], 1, __ATOMIC_ACQ_REL);
        if (k >= pieces)
            break;
        Py_ssize_t first = bounds[k], stop = bounds[k + 1];
        Py_ssize_t lo = first ? ends[first - 1] : 0, len = ends[stop - 1] - lo, got = 0;
        int err = 0;
        while (got < len) {
            ssize_t r = pread(fd, (char *)buf.buf + lo + got, (size_t)(len - got),
                              (off_t)(offset + lo + got));
            if (r < 0 && errno == EINTR)
                continue;
            if (r < 0) {
                err = errno;
                break;
            }
            if (r == 0)
                break;
            got += r;
        }
        if (got == len) {
            if (data_out.buf != NULL)
                checks_into(buf.buf, ends, first, stop, lo, 0, NULL, data_out.buf);
            if (summed_out.buf != NULL)
                checks_into(buf.buf, ends, first, stop, lo, 1, scratch, summed_out.buf);
        }
        state[1 + 2 * k] = got;
        state[2 + 2 * k] = err;
        done++;
    }
    Py_END_ALLOW_THREADS
    out = PyLong_FromSsize_t(done);
done:
    PyMem_Free(scratch);
    if (summed_out.buf != NULL)
        PyBuffer_Release(&summed_out);
    if (data_out.buf != NULL)
        PyBuffer_Release(&data_out);
    if (state_v.obj != NULL)
        PyBuffer_Release(&state_v);
    if (bounds_v.obj != NULL)
        PyBuffer_Release(&bounds_v);
    if (ends_v.obj != NULL)
        PyBuffer_Release(&ends_v);
    PyBuffer_Release(&buf);
    return out;
}

#define HEADER 512
#define SLOTS_AT 40
#define SLOTS 59
#define PAYLOAD (SLOTS * 7)

/* The payloads of n null extent headers (of each 8-byte slot all bytes but the dev_id, its
 * 4th) into out, n * PAYLOAD bytes. */
static void gather_payloads(const unsigned char *heads, Py_ssize_t n, unsigned char *out)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *slot = heads + i * HEADER + SLOTS_AT;
        for (int k = 0; k < SLOTS; k++, slot += 8, out += 7) {
            memcpy(out, slot, 3);
            memcpy(out + 3, slot + 4, 4);
        }
    }
}

PyDoc_STRVAR(null_payloads_doc,
"null_payloads(headers) -> bytes\n\n"
"vma.null_payloads: the payloads of consecutive 512-byte null extent headers, joined (of\n"
"each 8-byte slot all bytes but the dev_id, its 4th); a short last header is left out.");

static PyObject *null_payloads(PyObject *self, PyObject *arg)
{
    (void)self;
    Bytes in;
    if (bytes_get(arg, &in) < 0)
        return NULL;
    Py_ssize_t n = in.len / HEADER;
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * PAYLOAD);
    if (out != NULL)
        gather_payloads(in.buf, n, (unsigned char *)PyBytes_AS_STRING(out));
    bytes_release(&in);
    return out;
}

PyDoc_STRVAR(carried_checks_doc,
"carried_checks(headers, blocks, ends, refused) -> bytes | None\n\n"
"index.carried_checks: the index check (LE u32) of each stored cluster of a data extent of\n"
"`blocks` blocks (cluster i's data ending at ends[i], int64) from the block sums carried in\n"
"the null extent headers after it; None if they are not its sums: fewer headers than the\n"
"sums need, a nonzero byte after the sums, or a payload starting with one of `refused`\n"
"(bytes). Their md5 and dev_id bytes are not checked here.");

static PyObject *carried_checks(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *heads_obj, *ends_obj, *refused, *out = NULL;
    Py_ssize_t blocks, *ends = NULL, n = 0, longest = 0;
    unsigned char *payload = NULL;
    Bytes heads;
    if (!PyArg_ParseTuple(args, "OnOO!:carried_checks", &heads_obj, &blocks, &ends_obj,
                          &PyTuple_Type, &refused))
        return NULL;
    if (blocks < 0 || blocks > PY_SSIZE_T_MAX / BLOCK) {
        PyErr_SetString(PyExc_ValueError, "blocks out of range");
        return NULL;
    }
    if (bytes_get(heads_obj, &heads) < 0)
        return NULL;
    Py_ssize_t size = blocks * SUM_SIZE, count = (size + PAYLOAD - 1) / PAYLOAD;
    ends = ends_get(ends_obj, blocks * BLOCK, &n, &longest);
    if (ends == NULL)
        goto done;
    if (heads.len < count * HEADER) {
        out = Py_NewRef(Py_None);
        goto done;
    }
    payload = PyMem_Malloc((size_t)(count ? count * PAYLOAD : 1));
    if (payload == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    gather_payloads(heads.buf, count, payload);
    for (Py_ssize_t at = size; at < count * PAYLOAD; at++) {
        if (payload[at]) {
            out = Py_NewRef(Py_None);
            goto done;
        }
    }
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(refused); k++) {
        char *prefix;
        Py_ssize_t len;
        if (PyBytes_AsStringAndSize(PyTuple_GET_ITEM(refused, k), &prefix, &len) < 0)
            goto done;
        if (len <= count * PAYLOAD && memcmp(payload, prefix, (size_t)len) == 0) {
            out = Py_NewRef(Py_None);
            goto done;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++)  /* where each cluster's sums end */
        ends[i] /= BLOCK / SUM_SIZE;
    out = PyBytes_FromStringAndSize(NULL, n * SUM_SIZE);
    if (out != NULL)  /* ~4 KiB of sums: hashed with the GIL held (see GIL_FREE_FROM) */
        checks_into(payload, ends, 0, n, 0, 0, NULL, (unsigned char *)PyBytes_AS_STRING(out));
done:
    PyMem_Free(payload);
    PyMem_Free(ends);
    bytes_release(&heads);
    return out;
}

/* --- extent headers: vma.check_extent_header's checks, for a run of headers at once -------- */

/* MD5 (RFC 1321) of one 512-byte extent header with its md5 field (bytes 24-40) zeroed: the
 * header is 8 blocks of 64 bytes, then one block of padding and the length in bits. */
static uint32_t md5_k[64];  /* floor(|sin(i + 1)| * 2^32), filled at import */
static const unsigned char md5_shift[4][4] = {{7, 12, 17, 22}, {5, 9, 14, 20}, {4, 11, 16, 23},
                                              {6, 10, 15, 21}};

static inline uint32_t rotl32(uint32_t x, unsigned n)
{
    return (x << n) | (x >> (32 - n));
}

static inline uint32_t get_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* One MD5 step: the round's function f of b, c, d, then the rotation. */
#define MD5_STEP(f, i, g, r)                                                                   \
    do {                                                                                       \
        uint32_t t = a + (f) + md5_k[i] + w[g];                                                \
        a = d;                                                                                 \
        d = c;                                                                                 \
        c = b;                                                                                 \
        b += rotl32(t, md5_shift[r][(i) % 4]);                                                 \
    } while (0)

static void md5_block(uint32_t h[4], const unsigned char *block)
{
    uint32_t w[16], a = h[0], b = h[1], c = h[2], d = h[3];
    for (int i = 0; i < 16; i++)
        w[i] = get_le32(block + 4 * i);
    for (int i = 0; i < 16; i++)
        MD5_STEP((b & c) | (~b & d), i, i, 0);
    for (int i = 16; i < 32; i++)
        MD5_STEP((d & b) | (~d & c), i, (5 * i + 1) % 16, 1);
    for (int i = 32; i < 48; i++)
        MD5_STEP(b ^ c ^ d, i, (3 * i + 5) % 16, 2);
    for (int i = 48; i < 64; i++)
        MD5_STEP(c ^ (b | ~d), i, (7 * i) % 16, 3);
    h[0] += a;
    h[1] += b;
    h[2] += c;
    h[3] += d;
}

static void md5_header(const unsigned char *head, unsigned char digest[16])
{
    unsigned char block[64];
    uint32_t h[4] = {0x67452301u, 0xefcdab89u, 0x98badcfeu, 0x10325476u};
    memcpy(block, head, 64);
    memset(block + 24, 0, 16);
    md5_block(h, block);
    for (int k = 64; k < HEADER; k += 64)
        md5_block(h, head + k);
    memset(block, 0, sizeof block);
    block[0] = 0x80;
    block[57] = (HEADER * 8) >> 8;  /* the length in bits, LE u64: 4096 */
    md5_block(h, block);
    for (int i = 0; i < 4; i++)
        put_le32(digest + 4 * i, h[i]);
}

#define MAX_BLOCKS (SLOTS * 16)

/* The block count of a header that passes every check of vma.check_extent_header, else -1. */
static long header_blocks(const unsigned char *head, const unsigned char *uuid)
{
    unsigned char digest[16];
    md5_header(head, digest);
    if (memcmp(digest, head + 24, 16) != 0 || memcmp(head + 8, uuid, 16) != 0
            || memcmp(head, "VMAE\0\0", 6) != 0)
        return -1;
    long blocks = (long)head[6] << 8 | head[7];
    return blocks <= MAX_BLOCKS ? blocks : -1;
}

PyDoc_STRVAR(check_headers_doc,
"check_headers(headers, uuid) -> (nulls, block_count)\n\n"
"vma.check_extent_headers: how many of the whole 512-byte extent headers at the start of\n"
"headers pass every check of vma.check_extent_header with a block count of 0, and the block\n"
"count of the one after them if it is whole and passes them too (-1 if not). The GIL is\n"
"released for more than a few headers.");

static PyObject *check_headers(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *heads_obj;
    const char *uuid;
    Py_ssize_t uuid_len, nulls = 0;
    long blocks = -1;
    Bytes heads;
    if (!PyArg_ParseTuple(args, "Oy#:check_headers", &heads_obj, &uuid, &uuid_len))
        return NULL;
    if (uuid_len != 16) {
        PyErr_SetString(PyExc_ValueError, "uuid must be 16 bytes");
        return NULL;
    }
    if (bytes_get(heads_obj, &heads) < 0)
        return NULL;
    Py_ssize_t n = heads.len / HEADER;
    const unsigned char *buf = heads.buf, *id = (const unsigned char *)uuid;
    if (n > 4) {
        Py_BEGIN_ALLOW_THREADS
        while (nulls < n && (blocks = header_blocks(buf + nulls * HEADER, id)) == 0)
            nulls++;
        Py_END_ALLOW_THREADS
    } else {
        while (nulls < n && (blocks = header_blocks(buf + nulls * HEADER, id)) == 0)
            nulls++;
    }
    if (nulls == n)
        blocks = -1;
    bytes_release(&heads);
    return Py_BuildValue("(nl)", nulls, blocks);
}

PyDoc_STRVAR(used_slots_doc,
"used_slots(header) -> (dev_ids, clusters, masks, ends, blocks)\n\n"
"vma.used_slots: the used slots (dev_id != 0) of a 512-byte extent header, in slot order, as\n"
"bytearrays of native u8 dev_ids, u32 clusters and u16 masks; where each one with a nonzero\n"
"mask ends in the extent's data (native int64, bytes); and how many blocks the masks store.\n"
"Its md5, magic and block count are not checked here.");

static PyObject *used_slots(PyObject *self, PyObject *arg)
{
    (void)self;
    Bytes head;
    uint8_t dev_ids[SLOTS];
    uint32_t clusters[SLOTS];
    uint16_t masks[SLOTS];
    int64_t ends[SLOTS];
    Py_ssize_t used = 0, stored = 0;
    int64_t blocks = 0;
    if (bytes_get(arg, &head) < 0)
        return NULL;
    if (head.len < HEADER) {
        bytes_release(&head);
        PyErr_SetString(PyExc_ValueError, "an extent header is 512 bytes");
        return NULL;
    }
    for (int k = 0; k < SLOTS; k++) {
        const unsigned char *slot = head.buf + SLOTS_AT + 8 * k;
        if (!slot[3])
            continue;
        uint16_t mask = (uint16_t)(slot[0] << 8 | slot[1]);
        dev_ids[used] = slot[3];
        clusters[used] = (uint32_t)slot[4] << 24 | (uint32_t)slot[5] << 16
                         | (uint32_t)slot[6] << 8 | slot[7];
        masks[used++] = mask;
        if (mask) {
            blocks += __builtin_popcount(mask);
            ends[stored++] = blocks * BLOCK;
        }
    }
    bytes_release(&head);
    return Py_BuildValue("(NNNNL)",
                         PyByteArray_FromStringAndSize((const char *)dev_ids, used),
                         PyByteArray_FromStringAndSize((const char *)clusters, used * 4),
                         PyByteArray_FromStringAndSize((const char *)masks, used * 2),
                         PyByteArray_FromStringAndSize((const char *)ends, stored * 8),
                         (long long)blocks);
}

static PyMethodDef methods[] = {
    {"null_payloads", null_payloads, METH_O, null_payloads_doc},
    {"carried_checks", carried_checks, METH_VARARGS, carried_checks_doc},
    {"block_sums", (PyCFunction)(void (*)(void))block_sums, METH_FASTCALL, block_sums_doc},
    {"checks", (PyCFunction)(void (*)(void))checks, METH_VARARGS | METH_KEYWORDS, checks_doc},
    {"read_pieces", read_pieces, METH_VARARGS, read_pieces_doc},
    {"check_headers", check_headers, METH_VARARGS, check_headers_doc},
    {"used_slots", used_slots, METH_O, used_slots_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "vmafs.format._blocksums",
    "vmafs's block sums and index checks with the GIL released (see vmafs/format/index.py).",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blocksums(void)
{
    for (int i = 0; i < 64; i++)
        md5_k[i] = (uint32_t)(fabs(sin((double)(i + 1))) * 4294967296.0);
    if (md5_k[0] != 0xd76aa478u || md5_k[63] != 0xeb86d391u) {
        PyErr_SetString(PyExc_ImportError, "this platform's sin() is not what md5 needs");
        return NULL;
    }
    return PyModule_Create(&module);
}
