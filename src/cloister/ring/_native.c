/*
 * cloister.ring._native: the C accelerator of the consistent hash ring.
 *
 * It reproduces cloister/ring/_hash.py and _pure.py bit for bit (the tests check it):
 * the same 64-bit key hash, the same slot table, the same rankings. Only the cost
 * differs. See cloister/ring/__init__.py for the design.
 *
 * RingCore is the base type of cloister.HashRing. Its key_to_node is a C method, so
 * `ring.key_to_node(key)` runs no Python frame: one hash, one table index.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SLOT_BITS 18
#define NSLOTS ((Py_ssize_t)1 << SLOT_BITS)
#define SLOT_SHIFT (64 - SLOT_BITS)
#define MAX_NODES 0xFFFF
#define FNV_OFFSET 0xcbf29ce484222325ULL
#define FNV_PRIME 0x100000001b3ULL
#define GOLDEN 0x9e3779b97f4a7c15ULL
#define TWO_M53 (1.0 / 9007199254740992.0) /* 2**-53 */

/* ------------------------------------------------------------------ hashing */

static inline uint64_t
mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t
fnv(uint64_t h, const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        h = (h ^ p[i]) * FNV_PRIME;
    }
    return h;
}

static inline uint64_t
fnv_u64le(uint64_t h, uint64_t v)
{
    unsigned char b[8];
    for (int i = 0; i < 8; i++) {
        b[i] = (unsigned char)(v >> (8 * i));
    }
    return fnv(h, b, 8);
}

static inline uint64_t
fnv_tag(char tag)
{
    return (FNV_OFFSET ^ (unsigned char)tag) * FNV_PRIME;
}

static PyObject *
key_type_error(PyObject *key)
{
    return PyErr_Format(PyExc_TypeError,
                        "unsupported ring key type '%.200s': ring keys must be str, bytes, "
                        "int (not bool) or tuples of them",
                        Py_TYPE(key)->tp_name);
}

static int hash_key(PyObject *key, uint64_t *out);

static int
hash_str(PyObject *key, uint64_t *out)
{
    const char *data;
    Py_ssize_t len;
    if (PyUnicode_IS_COMPACT_ASCII(key)) {
        data = (const char *)PyUnicode_DATA(key);
        len = PyUnicode_GET_LENGTH(key);
    }
    else {
        data = PyUnicode_AsUTF8AndSize(key, &len);
        if (data == NULL) {
            /* lone surrogates: encode them as-is, like str.encode("utf-8", "surrogatepass") */
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
                return -1;
            }
            PyErr_Clear();
            PyObject *b = PyUnicode_AsEncodedString(key, "utf-8", "surrogatepass");
            if (b == NULL) {
                return -1;
            }
            *out = mix64(fnv(fnv_tag('s'), (const unsigned char *)PyBytes_AS_STRING(b),
                             PyBytes_GET_SIZE(b)));
            Py_DECREF(b);
            return 0;
        }
    }
    *out = mix64(fnv(fnv_tag('s'), (const unsigned char *)data, len));
    return 0;
}

static int
hash_int(PyObject *key, uint64_t *out)
{
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(key, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (!overflow) {
        unsigned char buf[24];
        int pos = (int)sizeof(buf);
        unsigned long long m = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
        do {
            buf[--pos] = (unsigned char)('0' + (int)(m % 10));
            m /= 10;
        } while (m);
        if (v < 0) {
            buf[--pos] = '-';
        }
        *out = mix64(fnv(fnv_tag('i'), buf + pos, (Py_ssize_t)sizeof(buf) - pos));
        return 0;
    }
    /* beyond 64 bits: int.__repr__, which is what the pure implementation uses */
    PyObject *s = PyLong_Type.tp_repr(key);
    if (s == NULL) {
        return -1;
    }
    Py_ssize_t len;
    const char *data = PyUnicode_AsUTF8AndSize(s, &len);
    if (data == NULL) {
        Py_DECREF(s);
        return -1;
    }
    *out = mix64(fnv(fnv_tag('i'), (const unsigned char *)data, len));
    Py_DECREF(s);
    return 0;
}

static int
hash_tuple(PyObject *key, uint64_t *out)
{
    Py_ssize_t n = PyTuple_GET_SIZE(key);
    uint64_t h = fnv_u64le(fnv_tag('t'), (uint64_t)n);
    if (Py_EnterRecursiveCall(" while hashing a nested ring key")) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t item;
        if (hash_key(PyTuple_GET_ITEM(key, i), &item) < 0) {
            Py_LeaveRecursiveCall();
            return -1;
        }
        h = fnv_u64le(h, item);
    }
    Py_LeaveRecursiveCall();
    *out = mix64(h);
    return 0;
}

/* The 64-bit hash of a ring key (see _hash.key_hash). 0 on success, -1 with an error set. */
static int
hash_key(PyObject *key, uint64_t *out)
{
    if (PyUnicode_Check(key)) {
        return hash_str(key, out);
    }
    if (PyBytes_Check(key)) {
        *out = mix64(fnv(fnv_tag('b'), (const unsigned char *)PyBytes_AS_STRING(key),
                         PyBytes_GET_SIZE(key)));
        return 0;
    }
    if (PyLong_Check(key) && !PyBool_Check(key)) {
        return hash_int(key, out);
    }
    if (PyTuple_Check(key)) {
        return hash_tuple(key, out);
    }
    key_type_error(key);
    return -1;
}

/* ------------------------------------------------------------------ scores */

static inline double
unit(uint64_t u)
{
    return ((double)(u >> 11) + 0.5) * TWO_M53;
}

/* Resch's weighted rendezvous score -w / ln(u01); the draw rounding to 1.0 scores +inf. */
static inline double
wscore(uint64_t u, double w)
{
    double ln = log(unit(u));
    return ln < 0.0 ? -w / ln : INFINITY;
}

/*
 * Does a node of weight w with draw u surely score below `best`? -ln(x) >= 1 - x, so
 * w / (1 - x) bounds its score from above; with a margin far above rounding errors, a
 * node whose bound is below the best score loses for sure and its logarithm can be
 * skipped, keeping results exact. (A draw of 1.0 or a best of +inf never prunes wrongly:
 * 0 * inf is NaN, and NaN compares false.)
 */
static inline int
surely_loses(uint64_t u, double w, double best)
{
    return w * (1.0 + 0x1p-30) < (1.0 - unit(u)) * best;
}

/* Does candidate a beat candidate b? Score, then draw (both higher first), then index. */
static inline int
beats(double sa, uint64_t ua, Py_ssize_t ia, double sb, uint64_t ub, Py_ssize_t ib)
{
    if (sa != sb) {
        return sa > sb;
    }
    if (ua != ub) {
        return ua > ub;
    }
    return ia < ib;
}

typedef struct {
    double s;   /* weighted score (0 for all when the weights are equal) */
    uint64_t u; /* draw */
    Py_ssize_t i;
} Cand;

static int
cand_cmp(const void *pa, const void *pb)
{
    const Cand *a = (const Cand *)pa, *b = (const Cand *)pb;
    if (beats(a->s, a->u, a->i, b->s, b->u, b->i)) {
        return -1;
    }
    return a->i == b->i ? 0 : 1;
}

/* ------------------------------------------------------------------ the core type */

typedef struct {
    PyObject_HEAD
    PyObject *names;   /* tuple of str, strictly ascending */
    PyObject *weights; /* tuple of float, one per name */
    Py_ssize_t n;
    uint64_t *seeds; /* key hash of each name */
    double *w;       /* each weight */
    int equal;       /* all weights equal: rank by draw alone */
    uint16_t *table; /* NSLOTS node indices, NULL when n == 0 */
} RingCore;

static PyTypeObject RingCore_Type;
static PyObject *empty_ring_error_type = NULL;

static PyObject *
empty_ring_error(const char *message)
{
    if (empty_ring_error_type == NULL) {
        /* imported lazily: cloister.errors imports the package that imports us */
        PyObject *mod = PyImport_ImportModule("cloister.errors");
        if (mod != NULL) {
            empty_ring_error_type = PyObject_GetAttrString(mod, "EmptyRingError");
            Py_DECREF(mod);
        }
        if (empty_ring_error_type == NULL) {
            PyErr_Clear();
            Py_INCREF(PyExc_LookupError);
            empty_ring_error_type = PyExc_LookupError;
        }
    }
    PyErr_SetString(empty_ring_error_type, message);
    return NULL;
}

static PyObject *
raise_empty(void)
{
    return empty_ring_error("ring has no nodes; add a node first");
}

/* Best node for a slot among those not in skip (skip may be NULL); -1 if all skipped.
   Always inlined, so that the table builders get a copy specialised for skip == NULL. */
static inline Py_ALWAYS_INLINE Py_ssize_t
best_node(const RingCore *r, Py_ssize_t slot, const unsigned char *skip)
{
    const uint64_t *seeds = r->seeds;
    const double *w = r->w;
    const Py_ssize_t n = r->n;
    const uint64_t g = (uint64_t)slot * GOLDEN;
    Py_ssize_t i = 0;
    while (skip && i < n && skip[i]) {
        i++;
    }
    if (i == n) {
        return -1;
    }
    Py_ssize_t best = i;
    uint64_t bu = mix64(seeds[i] + g);
    if (r->equal) {
        /* the highest draw wins (the lowest index on a tie); branch-free selects, as
           which node wins is unpredictable */
        for (i++; i < n; i++) {
            uint64_t u = mix64(seeds[i] + g);
            uint64_t wins = (uint64_t)((u > bu) & (skip == NULL || !skip[i]));
            uint64_t mask = (uint64_t)0 - wins; /* all ones when node i wins */
            best = (Py_ssize_t)((uint64_t)best ^ (((uint64_t)best ^ (uint64_t)i) & mask));
            bu ^= (bu ^ u) & mask;
        }
        return best;
    }
    double bs = wscore(bu, w[best]);
    for (i++; i < n; i++) {
        if (skip && skip[i]) {
            continue;
        }
        uint64_t u = mix64(seeds[i] + g);
        if (surely_loses(u, w[i], bs)) {
            continue;
        }
        double s = wscore(u, w[i]);
        if (beats(s, u, i, bs, bu, best)) {
            best = i;
            bu = u;
            bs = s;
        }
    }
    return best;
}

static void
build_table(RingCore *r)
{
    for (Py_ssize_t s = 0; s < NSLOTS; s++) {
        r->table[s] = (uint16_t)best_node(r, s, NULL);
    }
}

/* New, empty core of type `type` holding n nodes (names/weights still to set). */
static RingCore *
core_alloc(PyTypeObject *type, Py_ssize_t n)
{
    RingCore *r = (RingCore *)type->tp_alloc(type, 0);
    if (r == NULL) {
        return NULL;
    }
    r->n = n;
    r->seeds = PyMem_Malloc(sizeof(uint64_t) * (size_t)(n ? n : 1));
    r->w = PyMem_Malloc(sizeof(double) * (size_t)(n ? n : 1));
    if (n) {
        r->table = PyMem_Malloc(sizeof(uint16_t) * (size_t)NSLOTS);
    }
    if (r->seeds == NULL || r->w == NULL || (n && r->table == NULL)) {
        Py_DECREF(r);
        PyErr_NoMemory();
        return NULL;
    }
    return r;
}

static void
set_equal(RingCore *r)
{
    r->equal = 1;
    for (Py_ssize_t i = 1; i < r->n; i++) {
        if (r->w[i] != r->w[0]) {
            r->equal = 0;
            break;
        }
    }
}

static void
RingCore_dealloc(RingCore *self)
{
    Py_XDECREF(self->names);
    Py_XDECREF(self->weights);
    PyMem_Free(self->seeds);
    PyMem_Free(self->w);
    PyMem_Free(self->table);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
RingCore_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    PyErr_Format(PyExc_TypeError, "%.200s cannot be created directly; use cloister.HashRing",
                 type->tp_name);
    return NULL;
}

PyDoc_STRVAR(build_doc,
             "_build(names, weights)\n--\n\n"
             "A ring of `names` (tuple of str, strictly ascending) weighing `weights`\n"
             "(tuple of finite positive floats). Internal: HashRing validates first.");

static PyObject *
RingCore_build(PyTypeObject *type, PyObject *args)
{
    PyObject *names, *weights;
    if (!PyArg_ParseTuple(args, "O!O!:_build", &PyTuple_Type, &names, &PyTuple_Type, &weights)) {
        return NULL;
    }
    if (!PyType_IsSubtype(type, &RingCore_Type)) {
        return PyErr_Format(PyExc_TypeError, "_build needs a RingCore subtype");
    }
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (PyTuple_GET_SIZE(weights) != n) {
        return PyErr_Format(PyExc_ValueError, "names and weights differ in length");
    }
    if (n > MAX_NODES) {
        return PyErr_Format(PyExc_ValueError, "a ring holds at most %d nodes, got %zd",
                            MAX_NODES, n);
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        PyObject *weight = PyTuple_GET_ITEM(weights, i);
        if (!PyUnicode_CheckExact(name) || !PyFloat_CheckExact(weight)) {
            return PyErr_Format(PyExc_TypeError, "names must be str and weights float");
        }
        double w = PyFloat_AS_DOUBLE(weight);
        if (!(isfinite(w) && w > 0.0)) {
            return PyErr_Format(PyExc_ValueError, "weights must be finite and > 0");
        }
        if (i > 0) {
            int c = PyUnicode_Compare(PyTuple_GET_ITEM(names, i - 1), name);
            if (c == -1 && PyErr_Occurred()) {
                return NULL;
            }
            if (c >= 0) {
                return PyErr_Format(PyExc_ValueError, "names must be distinct and sorted");
            }
        }
    }
    RingCore *r = core_alloc(type, n);
    if (r == NULL) {
        return NULL;
    }
    Py_INCREF(names);
    r->names = names;
    Py_INCREF(weights);
    r->weights = weights;
    for (Py_ssize_t i = 0; i < n; i++) {
        r->w[i] = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(weights, i));
        if (hash_key(PyTuple_GET_ITEM(names, i), &r->seeds[i]) < 0) {
            Py_DECREF(r);
            return NULL;
        }
    }
    set_equal(r);
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        build_table(r);
        Py_END_ALLOW_THREADS
    }
    return (PyObject *)r;
}

/* Where `name` (a str) is, or would be inserted, among the sorted names; *found tells. */
static Py_ssize_t
bisect_name(const RingCore *r, PyObject *name, int *found)
{
    Py_ssize_t lo = 0, hi = r->n;
    *found = 0;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        int c = PyUnicode_Compare(PyTuple_GET_ITEM(r->names, mid), name);
        if (c == 0) {
            *found = 1;
            return mid;
        }
        if (c < 0) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    return lo;
}

/* Index of `name` (a str) among the sorted names, or -1 when absent. */
static Py_ssize_t
find_name(const RingCore *r, PyObject *name)
{
    int found;
    Py_ssize_t at = bisect_name(r, name, &found);
    return found ? at : -1;
}

/* A tuple equal to `t` with `item` inserted at `at` (item != NULL) or removed from `at`. */
static PyObject *
tuple_edit(PyObject *t, Py_ssize_t at, PyObject *item)
{
    Py_ssize_t n = PyTuple_GET_SIZE(t);
    Py_ssize_t m = item ? n + 1 : n - 1;
    PyObject *out = PyTuple_New(m);
    if (out == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0, j = 0; i < n; i++) {
        if (i == at) {
            if (item) {
                Py_INCREF(item);
                PyTuple_SET_ITEM(out, j++, item);
            }
            else {
                continue;
            }
        }
        PyObject *x = PyTuple_GET_ITEM(t, i);
        Py_INCREF(x);
        PyTuple_SET_ITEM(out, j++, x);
    }
    if (item && at == n) {
        Py_INCREF(item);
        PyTuple_SET_ITEM(out, n, item);
    }
    return out;
}

/* Fill r (n nodes, names/weights set) from old's arrays with `at` inserted or removed. */
static int
core_fill_arrays(RingCore *r, const RingCore *old, Py_ssize_t at, int inserting)
{
    for (Py_ssize_t i = 0, j = 0; i < old->n; i++) {
        if (i == at && inserting) {
            j++;
        }
        if (i == at && !inserting) {
            continue;
        }
        r->seeds[j] = old->seeds[i];
        r->w[j] = old->w[i];
        j++;
    }
    if (inserting) {
        r->w[at] = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(r->weights, at));
        if (hash_key(PyTuple_GET_ITEM(r->names, at), &r->seeds[at]) < 0) {
            return -1;
        }
    }
    set_equal(r);
    return 0;
}

static void
table_after_add(RingCore *r, const RingCore *old, Py_ssize_t at)
{
    /* The owner of a slot in r is the better of its owner in old and the new node. */
    uint64_t seed = r->seeds[at];
    double w = r->w[at];
    for (Py_ssize_t s = 0; s < NSLOTS; s++) {
        Py_ssize_t o = old->table[s];
        o += (o >= at);
        uint64_t g = (uint64_t)s * GOLDEN;
        uint64_t un = mix64(seed + g), uo = mix64(r->seeds[o] + g);
        int wins;
        if (r->equal) {
            wins = beats(0.0, un, at, 0.0, uo, o);
        }
        else {
            double so = wscore(uo, r->w[o]);
            wins = !surely_loses(un, w, so) && beats(wscore(un, w), un, at, so, uo, o);
        }
        r->table[s] = (uint16_t)(wins ? at : o);
    }
}

static void
table_after_remove(RingCore *r, const RingCore *old, Py_ssize_t at)
{
    /* Only the removed node's slots change hands: to the best of the others. */
    for (Py_ssize_t s = 0; s < NSLOTS; s++) {
        Py_ssize_t o = old->table[s];
        if (o == at) {
            r->table[s] = (uint16_t)best_node(r, s, NULL);
        }
        else {
            r->table[s] = (uint16_t)(o - (o > at));
        }
    }
}

PyDoc_STRVAR(with_node_doc,
             "_with_node(name, weight)\n--\n\n"
             "This ring plus `name` (not a member) weighing `weight`: O(slots).");

static PyObject *
RingCore_with_node(RingCore *self, PyObject *args)
{
    PyObject *name, *weight;
    if (!PyArg_ParseTuple(args, "UO!:_with_node", &name, &PyFloat_Type, &weight)) {
        return NULL;
    }
    double wv = PyFloat_AS_DOUBLE(weight);
    if (!(isfinite(wv) && wv > 0.0)) {
        return PyErr_Format(PyExc_ValueError, "weights must be finite and > 0");
    }
    if (self->n >= MAX_NODES) {
        return PyErr_Format(PyExc_ValueError, "a ring holds at most %d nodes", MAX_NODES);
    }
    if (!PyUnicode_CheckExact(name)) {
        name = PyUnicode_FromObject(name); /* plain str for a str subclass */
        if (name == NULL) {
            return NULL;
        }
    }
    else {
        Py_INCREF(name);
    }
    int found;
    Py_ssize_t at = bisect_name(self, name, &found);
    if (found) {
        PyErr_Format(PyExc_ValueError, "node %R is already in the ring", name);
        Py_DECREF(name);
        return NULL;
    }
    PyObject *weight_f = PyFloat_FromDouble(wv);
    if (weight_f == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    RingCore *r = core_alloc(Py_TYPE(self), self->n + 1);
    if (r == NULL) {
        Py_DECREF(name);
        Py_DECREF(weight_f);
        return NULL;
    }
    r->names = tuple_edit(self->names, at, name);
    r->weights = tuple_edit(self->weights, at, weight_f);
    Py_DECREF(name);
    Py_DECREF(weight_f);
    if (r->names == NULL || r->weights == NULL || core_fill_arrays(r, self, at, 1) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    if (self->n == 0) {
        build_table(r);
    }
    else {
        table_after_add(r, self, at);
    }
    Py_END_ALLOW_THREADS
    return (PyObject *)r;
}

PyDoc_STRVAR(without_node_doc,
             "_without_node(name)\n--\n\n"
             "This ring minus `name` (a member): O(slots).");

static PyObject *
RingCore_without_node(RingCore *self, PyObject *name)
{
    Py_ssize_t at = PyUnicode_Check(name) ? find_name(self, name) : -1;
    if (at < 0) {
        return PyErr_Format(PyExc_ValueError, "node %R is not in the ring", name);
    }
    RingCore *r = core_alloc(Py_TYPE(self), self->n - 1);
    if (r == NULL) {
        return NULL;
    }
    r->names = tuple_edit(self->names, at, NULL);
    r->weights = tuple_edit(self->weights, at, NULL);
    if (r->names == NULL || r->weights == NULL || core_fill_arrays(r, self, at, 0) < 0) {
        Py_DECREF(r);
        return NULL;
    }
    if (r->n) {
        Py_BEGIN_ALLOW_THREADS
        table_after_remove(r, self, at);
        Py_END_ALLOW_THREADS
    }
    return (PyObject *)r;
}

/* ------------------------------------------------------------------ lookups */

/*
 * Normalise `exclude` into *out: NULL when it excludes nothing, else a new reference to a
 * container supporting `in` (the argument itself when it is a set, dict, list or tuple).
 */
static int
exclusion(PyObject *exclude, PyObject **out)
{
    *out = NULL;
    if (exclude == NULL || exclude == Py_None) {
        return 0;
    }
    if (PyUnicode_Check(exclude) || PyBytes_Check(exclude)) {
        PyErr_Format(PyExc_TypeError,
                     "exclude must be a collection of node names, not a %.200s; "
                     "write exclude={name} to exclude one node",
                     Py_TYPE(exclude)->tp_name);
        return -1;
    }
    PyObject *c;
    if (PyAnySet_Check(exclude) || PyDict_Check(exclude) || PyList_Check(exclude) ||
        PyTuple_Check(exclude)) {
        Py_INCREF(exclude);
        c = exclude;
    }
    else {
        c = PySequence_List(exclude);
        if (c == NULL) {
            return -1;
        }
    }
    Py_ssize_t size = PyObject_Length(c);
    if (size < 0) {
        Py_DECREF(c);
        return -1;
    }
    if (size == 0) {
        Py_DECREF(c);
        return 0;
    }
    *out = c;
    return 0;
}

/* A calloc'ed mask of the nodes named in `excluded` (non-str items are ignored). */
static unsigned char *
exclusion_mask(const RingCore *r, PyObject *excluded)
{
    unsigned char *skip = PyMem_Calloc((size_t)(r->n ? r->n : 1), 1);
    if (skip == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    PyObject *it = PyObject_GetIter(excluded);
    if (it == NULL) {
        PyMem_Free(skip);
        return NULL;
    }
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        if (PyUnicode_Check(item)) {
            Py_ssize_t i = find_name(r, item);
            if (i >= 0) {
                skip[i] = 1;
            }
        }
        Py_DECREF(item);
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        PyMem_Free(skip);
        return NULL;
    }
    return skip;
}

/*
 * Minimal METH_FASTCALL|METH_KEYWORDS argument parser: fills out[0..nmax) by position or
 * keyword from `kwlist`; out[i] stays NULL when absent. The first `nreq` are required.
 */
static int
parse_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, const char *fname,
           const char *const *kwlist, int nreq, int nmax, PyObject **out)
{
    for (int i = 0; i < nmax; i++) {
        out[i] = NULL;
    }
    if (nargs > nmax) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname,
                     nmax, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        out[i] = args[i];
    }
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *kw = PyTuple_GET_ITEM(kwnames, k);
        int found = -1;
        for (int i = 0; i < nmax; i++) {
            if (PyUnicode_CompareWithASCIIString(kw, kwlist[i]) == 0) {
                found = i;
                break;
            }
        }
        if (found < 0) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname,
                         kw);
            return -1;
        }
        if (out[found] != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         kwlist[found]);
            return -1;
        }
        out[found] = args[nargs + k];
    }
    for (int i = 0; i < nreq; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         kwlist[i]);
            return -1;
        }
    }
    return 0;
}

static PyObject *
all_excluded(const RingCore *r)
{
    PyObject *msg = PyUnicode_FromFormat(
        "all %zd nodes of the ring are excluded; no node is left to pick", r->n);
    if (msg == NULL) {
        return NULL;
    }
    empty_ring_error(PyUnicode_AsUTF8(msg));
    Py_DECREF(msg);
    return NULL;
}

PyDoc_STRVAR(key_to_node_doc,
             "key_to_node(key, exclude=None)\n--\n\n"
             "The node that owns `key`; with `exclude`, the most preferred node not in it.\n\n"
             "Raises EmptyRingError on an empty ring (or when every node is excluded) and\n"
             "TypeError for a key that is not str, bytes, int or a tuple of them.");

static PyObject *
RingCore_key_to_node(RingCore *self, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames)
{
    PyObject *key, *exclude = NULL;
    if (nargs == 1 && kwnames == NULL) {
        key = args[0];
    }
    else {
        static const char *const kwlist[] = {"key", "exclude"};
        PyObject *out[2];
        if (parse_args(args, nargs, kwnames, "key_to_node", kwlist, 1, 2, out) < 0) {
            return NULL;
        }
        key = out[0];
        exclude = out[1];
    }
    uint64_t h;
    if (PyUnicode_CheckExact(key) && PyUnicode_IS_COMPACT_ASCII(key)) {
        h = mix64(fnv(fnv_tag('s'), (const unsigned char *)PyUnicode_DATA(key),
                      PyUnicode_GET_LENGTH(key)));
    }
    else if (hash_key(key, &h) < 0) {
        return NULL;
    }
    if (self->n == 0) {
        return raise_empty();
    }
    Py_ssize_t slot = (Py_ssize_t)(h >> SLOT_SHIFT);
    PyObject *owner = PyTuple_GET_ITEM(self->names, self->table[slot]);
    if (exclude == NULL || exclude == Py_None) {
        Py_INCREF(owner);
        return owner;
    }
    PyObject *excluded;
    if (exclusion(exclude, &excluded) < 0) {
        return NULL;
    }
    if (excluded == NULL) {
        Py_INCREF(owner);
        return owner;
    }
    int hit = PySequence_Contains(excluded, owner);
    if (hit <= 0) {
        Py_DECREF(excluded);
        if (hit < 0) {
            return NULL;
        }
        Py_INCREF(owner);
        return owner;
    }
    unsigned char *skip = exclusion_mask(self, excluded);
    Py_DECREF(excluded);
    if (skip == NULL) {
        return NULL;
    }
    Py_ssize_t best = best_node(self, slot, skip);
    PyMem_Free(skip);
    if (best < 0) {
        return all_excluded(self);
    }
    PyObject *name = PyTuple_GET_ITEM(self->names, best);
    Py_INCREF(name);
    return name;
}

PyDoc_STRVAR(owned_by_doc,
             "owned_by(node, key)\n--\n\n"
             "True when `node` owns `key` (False on an empty ring): key_to_node(key) == node\n"
             "in one C call, for hot ownership checks such as Cluster.mine.");

static PyObject *
RingCore_owned_by(RingCore *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "owned_by() takes 2 arguments (node, key), got %zd", nargs);
        return NULL;
    }
    PyObject *node = args[0], *key = args[1];
    uint64_t h;
    if (PyUnicode_CheckExact(key) && PyUnicode_IS_COMPACT_ASCII(key)) {
        h = mix64(fnv(fnv_tag('s'), (const unsigned char *)PyUnicode_DATA(key),
                      PyUnicode_GET_LENGTH(key)));
    }
    else if (hash_key(key, &h) < 0) {
        return NULL;
    }
    if (self->n == 0) {
        Py_RETURN_FALSE;
    }
    PyObject *owner = PyTuple_GET_ITEM(self->names, self->table[h >> SLOT_SHIFT]);
    if (owner == node) {
        Py_RETURN_TRUE;
    }
    if (!PyUnicode_Check(node)) {
        Py_RETURN_FALSE;
    }
    return PyBool_FromLong(PyUnicode_Compare(owner, node) == 0);
}

/* All node indices for `slot`, best first, as a PyMem-allocated array of r->n Cand. */
static Cand *
rank_slot(const RingCore *r, Py_ssize_t slot)
{
    Cand *c = PyMem_Malloc(sizeof(Cand) * (size_t)(r->n ? r->n : 1));
    if (c == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    uint64_t g = (uint64_t)slot * GOLDEN;
    for (Py_ssize_t i = 0; i < r->n; i++) {
        c[i].u = mix64(r->seeds[i] + g);
        c[i].s = r->equal ? 0.0 : wscore(c[i].u, r->w[i]);
        c[i].i = i;
    }
    qsort(c, (size_t)r->n, sizeof(Cand), cand_cmp);
    return c;
}

PyDoc_STRVAR(key_to_nodes_doc,
             "key_to_nodes(key, n, exclude=None)\n--\n\n"
             "The `n` most preferred distinct nodes for `key`, best first, skipping\n"
             "`exclude`; fewer only when fewer nodes are left. The first is key_to_node(key).");

static PyObject *
RingCore_key_to_nodes(RingCore *self, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames)
{
    static const char *const kwlist[] = {"key", "n", "exclude"};
    PyObject *out[3];
    if (parse_args(args, nargs, kwnames, "key_to_nodes", kwlist, 2, 3, out) < 0) {
        return NULL;
    }
    uint64_t h;
    if (hash_key(out[0], &h) < 0) {
        return NULL;
    }
    if (!PyLong_Check(out[1]) || PyBool_Check(out[1])) {
        return PyErr_Format(PyExc_TypeError, "n must be an int, not %.200s",
                            Py_TYPE(out[1])->tp_name);
    }
    int overflow;
    long long want = PyLong_AsLongLongAndOverflow(out[1], &overflow);
    if (want == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (overflow < 0 || (!overflow && want < 0)) {
        return PyErr_Format(PyExc_ValueError, "n must be >= 0, got %R", out[1]);
    }
    if (overflow > 0 || want > self->n) {
        want = self->n;
    }
    if (self->n == 0) {
        return raise_empty();
    }
    PyObject *excluded;
    if (exclusion(out[2], &excluded) < 0) {
        return NULL;
    }
    unsigned char *skip = NULL;
    if (excluded != NULL) {
        skip = exclusion_mask(self, excluded);
        Py_DECREF(excluded);
        if (skip == NULL) {
            return NULL;
        }
    }
    Py_ssize_t slot = (Py_ssize_t)(h >> SLOT_SHIFT);
    Cand *c = rank_slot(self, slot);
    if (c == NULL) {
        PyMem_Free(skip);
        return NULL;
    }
    PyObject *result = PyList_New(0);
    for (Py_ssize_t k = 0; result != NULL && k < self->n && PyList_GET_SIZE(result) < want;
         k++) {
        if (skip && skip[c[k].i]) {
            continue;
        }
        if (PyList_Append(result, PyTuple_GET_ITEM(self->names, c[k].i)) < 0) {
            Py_CLEAR(result);
        }
    }
    PyMem_Free(c);
    PyMem_Free(skip);
    return result;
}

PyDoc_STRVAR(slot_of_doc,
             "slot_of(key)\n--\n\n"
             "The slot (0 <= slot < slots) that `key` falls into; it depends on the key only.");

/* The key hash of `key` shifted right by `shift` bits, as a Python int. */
static PyObject *
hash_shifted(PyObject *key, int shift)
{
    uint64_t h;
    if (hash_key(key, &h) < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(h >> shift);
}

static PyObject *
RingCore_slot_of(RingCore *Py_UNUSED(self), PyObject *key)
{
    return hash_shifted(key, SLOT_SHIFT);
}

/* Validate a slot argument; -1 with an error set when invalid. */
static Py_ssize_t
check_slot(PyObject *arg)
{
    if (!PyLong_Check(arg) || PyBool_Check(arg)) {
        PyErr_Format(PyExc_TypeError, "slot must be an int, not %.200s", Py_TYPE(arg)->tp_name);
        return -1;
    }
    int overflow;
    long long s = PyLong_AsLongLongAndOverflow(arg, &overflow);
    if (s == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow || s < 0 || s >= NSLOTS) {
        PyErr_Format(PyExc_ValueError, "slot must be in range(0, %zd), got %R", NSLOTS, arg);
        return -1;
    }
    return (Py_ssize_t)s;
}

PyDoc_STRVAR(owner_of_slot_doc, "owner_of_slot(slot)\n--\n\nThe node that owns `slot`.");

static PyObject *
RingCore_owner_of_slot(RingCore *self, PyObject *arg)
{
    Py_ssize_t slot = check_slot(arg);
    if (slot < 0) {
        return NULL;
    }
    if (self->n == 0) {
        return raise_empty();
    }
    PyObject *name = PyTuple_GET_ITEM(self->names, self->table[slot]);
    Py_INCREF(name);
    return name;
}

PyDoc_STRVAR(slot_ranking_doc,
             "_slot_ranking(slot)\n--\n\n"
             "All nodes in preference order for `slot` (its first is the slot's owner).");

static PyObject *
RingCore_slot_ranking(RingCore *self, PyObject *arg)
{
    Py_ssize_t slot = check_slot(arg);
    if (slot < 0) {
        return NULL;
    }
    Cand *c = rank_slot(self, slot);
    if (c == NULL) {
        return NULL;
    }
    PyObject *result = PyList_New(self->n);
    for (Py_ssize_t k = 0; result != NULL && k < self->n; k++) {
        PyObject *name = PyTuple_GET_ITEM(self->names, c[k].i);
        Py_INCREF(name);
        PyList_SET_ITEM(result, k, name);
    }
    PyMem_Free(c);
    return result;
}

PyDoc_STRVAR(table_bytes_doc,
             "_table_bytes()\n--\n\n"
             "The whole slot table as little-endian uint16 node indices (b'' when empty).");

static PyObject *
RingCore_table_bytes(RingCore *self, PyObject *Py_UNUSED(ignored))
{
    if (self->n == 0) {
        return PyBytes_FromStringAndSize(NULL, 0);
    }
    PyObject *b = PyBytes_FromStringAndSize(NULL, NSLOTS * 2);
    if (b == NULL) {
        return NULL;
    }
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(b);
    for (Py_ssize_t s = 0; s < NSLOTS; s++) {
        p[2 * s] = (unsigned char)(self->table[s] & 0xff);
        p[2 * s + 1] = (unsigned char)(self->table[s] >> 8);
    }
    return b;
}

PyDoc_STRVAR(counts_doc, "_counts()\n--\n\nHow many slots each node owns, in node order.");

static PyObject *
RingCore_counts(RingCore *self, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t *counts = PyMem_Calloc((size_t)(self->n ? self->n : 1), sizeof(Py_ssize_t));
    if (counts == NULL) {
        return PyErr_NoMemory();
    }
    for (Py_ssize_t s = 0; self->n && s < NSLOTS; s++) {
        counts[self->table[s]]++;
    }
    PyObject *result = PyList_New(self->n);
    for (Py_ssize_t i = 0; result != NULL && i < self->n; i++) {
        PyObject *v = PyLong_FromSsize_t(counts[i]);
        if (v == NULL) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, v);
    }
    PyMem_Free(counts);
    return result;
}

static PyMethodDef RingCore_methods[] = {
    {"key_to_node", (PyCFunction)(void (*)(void))RingCore_key_to_node,
     METH_FASTCALL | METH_KEYWORDS, key_to_node_doc},
    {"key_to_nodes", (PyCFunction)(void (*)(void))RingCore_key_to_nodes,
     METH_FASTCALL | METH_KEYWORDS, key_to_nodes_doc},
    {"owned_by", (PyCFunction)(void (*)(void))RingCore_owned_by, METH_FASTCALL, owned_by_doc},
    {"slot_of", (PyCFunction)RingCore_slot_of, METH_O, slot_of_doc},
    {"owner_of_slot", (PyCFunction)RingCore_owner_of_slot, METH_O, owner_of_slot_doc},
    {"_slot_ranking", (PyCFunction)RingCore_slot_ranking, METH_O, slot_ranking_doc},
    {"_table_bytes", (PyCFunction)RingCore_table_bytes, METH_NOARGS, table_bytes_doc},
    {"_counts", (PyCFunction)RingCore_counts, METH_NOARGS, counts_doc},
    {"_build", (PyCFunction)RingCore_build, METH_VARARGS | METH_CLASS, build_doc},
    {"_with_node", (PyCFunction)RingCore_with_node, METH_VARARGS, with_node_doc},
    {"_without_node", (PyCFunction)RingCore_without_node, METH_O, without_node_doc},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef RingCore_members[] = {
    {"_names", T_OBJECT_EX, offsetof(RingCore, names), READONLY, "node names, sorted"},
    {"_weights", T_OBJECT_EX, offsetof(RingCore, weights), READONLY, "node weights"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RingCore_Type = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "cloister.ring._native.RingCore",
    .tp_basicsize = sizeof(RingCore),
    .tp_dealloc = (destructor)RingCore_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = PyDoc_STR("Members, seeds and slot table of a ring; lookups (C implementation)."),
    .tp_methods = RingCore_methods,
    .tp_members = RingCore_members,
    .tp_new = RingCore_new,
};

/* ------------------------------------------------------------------ module */

PyDoc_STRVAR(key_hash_doc,
             "key_hash(key)\n--\n\n"
             "The 64-bit hash of a ring key, the same in every process, run and machine.");

static PyObject *
native_key_hash(PyObject *Py_UNUSED(module), PyObject *key)
{
    return hash_shifted(key, 0);
}

static PyMethodDef module_methods[] = {
    {"key_hash", (PyCFunction)native_key_hash, METH_O, key_hash_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "cloister.ring._native",
    .m_doc = "C accelerator of cloister.ring: key hash, slot table and lookups.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__native(void)
{
    if (PyType_Ready(&RingCore_Type) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&RingCore_Type);
    if (PyModule_AddObject(m, "RingCore", (PyObject *)&RingCore_Type) < 0 ||
        PyModule_AddIntConstant(m, "SLOT_BITS", SLOT_BITS) < 0 ||
        PyModule_AddIntConstant(m, "SLOTS", (long)NSLOTS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_NODES", MAX_NODES) < 0) {
        Py_DECREF(&RingCore_Type);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
