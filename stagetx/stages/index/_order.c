/* The ranked keys of a dense tier (board.DenseTier), held so that a search reads no Python object.
 *
 * A dense key is an int whose bits from 34 up are (score * 2**64, seq) and whose lower 34 bits
 * are a payload (kind, slot) that never decides the order within a tier. ``Order`` keeps each key
 * as its 192-bit ``key >> 34`` (the "prefix", inline) beside a reference to the int itself, in
 * leaves of at most 2 * LOAD entries; a search compares prefixes only, where a sorted list of ints
 * dereferences one int per probe, scattered over the heap (a cache miss each at a million keys).
 * The leaves' largest prefixes sit in one array for the first search, and a Fenwick tree over
 * the leaf sizes turns a position in a leaf into a rank.
 *
 * Contract: every key is an int with -2**225 <= key < 2**225, and no two keys held at once have
 * the same prefix (seqs are unique within a tier). A key out of range raises OverflowError before
 * anything changes (the tier then holds tuples instead).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define LOAD 64 /* a leaf holds LOAD / 2 .. 2 * LOAD entries (the last one may hold fewer) */

typedef struct {
    uint64_t hi, mid, lo; /* key >> 34 in two's complement, hi's sign bit flipped: unsigned order */
} Prefix;

typedef struct {
    Prefix p; /* first: a search reads the entries as prefixes ``sizeof(Entry)`` apart */
    PyObject *key;
} Entry;

typedef struct {
    Py_ssize_t n, cap;
    Entry *e;
} Leaf;

typedef struct {
    PyObject_HEAD
    Py_ssize_t len;
    Py_ssize_t nleaves, capleaves;
    Leaf *leaves;
    Prefix *maxes;     /* the largest prefix of each leaf */
    Py_ssize_t *tree;  /* Fenwick tree of leaf sizes (1-based); rebuilt when ``stale`` */
    int stale;
} Order;

static inline int
less(const Prefix *a, const Prefix *b)
{
    if (a->hi != b->hi)
        return a->hi < b->hi;
    if (a->mid != b->mid)
        return a->mid < b->mid;
    return a->lo < b->lo;
}

static inline int
same(const Prefix *a, const Prefix *b)
{
    return a->hi == b->hi && a->mid == b->mid && a->lo == b->lo;
}

/* The prefix of ``key``: 0, or 1 when the int is out of range (``sign`` then says which end:
 * -1 below every key, 1 above), or -1 with an exception set for a non-int. */
static int
prefix_of(PyObject *key, Prefix *out, int *sign)
{
    unsigned char buf[32];
    uint64_t w[4];
    int i, j;

    if (!PyLong_CheckExact(key)) {
        PyErr_Format(PyExc_TypeError, "an Order holds ints, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    {
        Py_ssize_t need = PyLong_AsNativeBytes(key, buf, 32, Py_ASNATIVEBYTES_LITTLE_ENDIAN);
        if (need < 0)
            return -1;
        if (need > 32) {
            PyLong_AsLongLongAndOverflow(key, sign); /* -1 or 1: the int's sign */
            return 1;
        }
    }
#else
    if (_PyLong_AsByteArray((PyLongObject *)key, buf, 32, 1, 1) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyLong_AsLongLongAndOverflow(key, sign); /* -1 or 1: the int's sign */
        return 1;
    }
#endif
    for (i = 0; i < 4; i++) {
        w[i] = 0;
        for (j = 7; j >= 0; j--)
            w[i] = (w[i] << 8) | buf[i * 8 + j];
    }
    {
        uint64_t hi = (w[2] >> 34) | (w[3] << 30);
        int64_t top = (int64_t)w[3] >> 34;
        if (top != ((int64_t)hi >> 63)) {
            *sign = top < 0 ? -1 : 1;
            return 1;
        }
        out->hi = hi ^ ((uint64_t)1 << 63);
        out->mid = (w[1] >> 34) | (w[2] << 30);
        out->lo = (w[0] >> 34) | (w[1] << 30);
    }
    return 0;
}

/* The prefix of a key to store: 0, or -1 with OverflowError/TypeError set. */
static int
storable(PyObject *key, Prefix *out)
{
    int sign, r = prefix_of(key, out, &sign);
    if (r == 1) {
        PyErr_SetString(PyExc_OverflowError, "key out of the range of a dense order");
        return -1;
    }
    return r;
}

/* The first of ``n`` prefixes, ``stride`` bytes apart from ``first`` on, that is >= p (``strict``:
 * > p); n when there is none. */
static inline Py_ssize_t
bisect_prefixes(const char *first, Py_ssize_t n, size_t stride, const Prefix *p, int strict)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        const Prefix *at = (const Prefix *)(first + mid * stride);
        if (strict ? !less(p, at) : less(at, p))
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* First leaf whose largest prefix is >= p (``strict``: > p); nleaves when there is none. */
static inline Py_ssize_t
find_leaf(const Order *o, const Prefix *p, int strict)
{
    return bisect_prefixes((const char *)o->maxes, o->nleaves, sizeof(Prefix), p, strict);
}

/* First entry of ``leaf`` whose prefix is >= p (``strict``: > p); its length when there is none. */
static inline Py_ssize_t
find_entry(const Leaf *leaf, const Prefix *p, int strict)
{
    return bisect_prefixes((const char *)leaf->e, leaf->n, sizeof(Entry), p, strict);
}

static void
rebuild_tree(Order *o)
{
    Py_ssize_t i, n = o->nleaves;
    Py_ssize_t *t = o->tree;
    t[0] = 0;
    for (i = 1; i <= n; i++)
        t[i] = o->leaves[i - 1].n;
    for (i = 1; i <= n; i++) {
        Py_ssize_t parent = i + (i & -i);
        if (parent <= n)
            t[parent] += t[i];
    }
    o->stale = 0;
}

/* The number of keys in leaves before ``leaf``. */
static inline Py_ssize_t
before(Order *o, Py_ssize_t leaf)
{
    Py_ssize_t sum = 0;
    if (o->stale)
        rebuild_tree(o);
    for (; leaf > 0; leaf -= leaf & -leaf)
        sum += o->tree[leaf];
    return sum;
}

/* The leaf that holds position ``pos`` (0 <= pos < len), and in ``idx`` the place in it: a
 * descent of the Fenwick tree, so a top-N read near the end needs no walk over every leaf. */
static Py_ssize_t
locate(Order *o, Py_ssize_t pos, Py_ssize_t *idx)
{
    Py_ssize_t at = 0, step = 1;
    if (o->stale)
        rebuild_tree(o);
    while (step <= o->nleaves / 2)
        step <<= 1;
    for (; step; step >>= 1) {
        if (at + step <= o->nleaves && o->tree[at + step] <= pos) {
            at += step;
            pos -= o->tree[at];
        }
    }
    *idx = pos;
    return at;
}

static inline void
count(Order *o, Py_ssize_t leaf, Py_ssize_t delta)
{
    Py_ssize_t i;
    if (o->stale)
        return;
    for (i = leaf + 1; i <= o->nleaves; i += i & -i)
        o->tree[i] += delta;
}

static int
reserve_leaves(Order *o, Py_ssize_t want)
{
    Py_ssize_t cap;
    Leaf *leaves;
    Prefix *maxes;
    Py_ssize_t *tree;
    if (want <= o->capleaves)
        return 0;
    cap = want + (want >> 3) + 8;
    leaves = PyMem_Realloc(o->leaves, cap * sizeof(Leaf));
    if (leaves == NULL)
        goto nomem;
    o->leaves = leaves;
    maxes = PyMem_Realloc(o->maxes, cap * sizeof(Prefix));
    if (maxes == NULL)
        goto nomem;
    o->maxes = maxes;
    tree = PyMem_Realloc(o->tree, (cap + 1) * sizeof(Py_ssize_t));
    if (tree == NULL)
        goto nomem;
    o->tree = tree;
    o->capleaves = cap;
    return 0;
nomem:
    PyErr_NoMemory();
    return -1;
}

/* Give ``leaf`` room for ``want`` entries: exactly that many when ``exact``, else with some slack
 * for the next insertions (never past 2 * LOAD + 1, the most a leaf holds before it splits). */
static int
size_leaf(Leaf *leaf, Py_ssize_t want, int exact)
{
    Py_ssize_t cap = exact ? want : want + (want >> 3) + 4;
    Entry *e;
    if (cap > 2 * LOAD + 1 && want <= 2 * LOAD + 1)
        cap = 2 * LOAD + 1;
    if (cap < 1)
        cap = 1;
    e = PyMem_Realloc(leaf->e, cap * sizeof(Entry));
    if (e == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    leaf->e = e;
    leaf->cap = cap;
    return 0;
}

static inline int
reserve_entries(Leaf *leaf, Py_ssize_t want)
{
    return want <= leaf->cap ? 0 : size_leaf(leaf, want, 0);
}

/* Make room for a new leaf at ``at`` (empty, its max unset); the tree goes stale. */
static int
open_leaf(Order *o, Py_ssize_t at)
{
    if (reserve_leaves(o, o->nleaves + 1) < 0)
        return -1;
    memmove(&o->leaves[at + 1], &o->leaves[at], (o->nleaves - at) * sizeof(Leaf));
    memmove(&o->maxes[at + 1], &o->maxes[at], (o->nleaves - at) * sizeof(Prefix));
    o->leaves[at].n = o->leaves[at].cap = 0;
    o->leaves[at].e = NULL;
    o->nleaves++;
    o->stale = 1;
    return 0;
}

static void
close_leaf(Order *o, Py_ssize_t at)
{
    PyMem_Free(o->leaves[at].e);
    memmove(&o->leaves[at], &o->leaves[at + 1], (o->nleaves - at - 1) * sizeof(Leaf));
    memmove(&o->maxes[at], &o->maxes[at + 1], (o->nleaves - at - 1) * sizeof(Prefix));
    o->nleaves--;
    o->stale = 1;
}

/* Split leaf ``at`` in two halves. */
static int
split(Order *o, Py_ssize_t at)
{
    Leaf *left, *right;
    Py_ssize_t half;
    if (open_leaf(o, at + 1) < 0)
        return -1;
    left = &o->leaves[at];
    right = &o->leaves[at + 1];
    half = left->n >> 1;
    if (reserve_entries(right, left->n - half) < 0) {
        close_leaf(o, at + 1);
        return -1;
    }
    memcpy(right->e, &left->e[half], (left->n - half) * sizeof(Entry));
    right->n = left->n - half;
    left->n = half;
    if (size_leaf(left, half, 0) < 0)
        PyErr_Clear(); /* the left half keeps its longer allocation */
    o->maxes[at + 1] = o->maxes[at];
    o->maxes[at] = left->e[half - 1].p;
    return 0;
}

/* Merge the short leaf ``at`` with its neighbour (the one before it, or after it for the first
 * leaf), splitting the result when it is too long: 0, or -1 with nothing changed when there is no
 * memory for it (a short leaf is still valid). */
static int
merge(Order *o, Py_ssize_t at)
{
    Py_ssize_t into = at > 0 ? at - 1 : at, from = into + 1;
    Leaf *a = &o->leaves[into], *b = &o->leaves[from];
    if (reserve_entries(a, a->n + b->n) < 0) {
        PyErr_Clear();
        return -1;
    }
    memcpy(&a->e[a->n], b->e, b->n * sizeof(Entry));
    a->n += b->n;
    o->maxes[into] = o->maxes[from];
    b->n = 0;
    close_leaf(o, from);
    if (a->n > 2 * LOAD && split(o, into) < 0)
        PyErr_Clear(); /* a long leaf is still valid */
    return 0;
}

/* Insert ``key`` (prefix ``p``, a new reference taken); its 0-based position, or -1. */
static Py_ssize_t
put(Order *o, PyObject *key, const Prefix *p)
{
    Py_ssize_t at, idx, half;
    Leaf *leaf;
    if (o->nleaves == 0) {
        if (open_leaf(o, 0) < 0)
            return -1;
        o->maxes[0] = *p;
    }
    at = find_leaf(o, p, 1);
    if (at == o->nleaves)
        at--;
    leaf = &o->leaves[at];
    if (reserve_entries(leaf, leaf->n + 1) < 0)
        return -1;
    idx = find_entry(leaf, p, 1);
    memmove(&leaf->e[idx + 1], &leaf->e[idx], (leaf->n - idx) * sizeof(Entry));
    leaf->e[idx].p = *p;
    leaf->e[idx].key = key;
    Py_INCREF(key);
    leaf->n++;
    o->len++;
    if (idx == leaf->n - 1)
        o->maxes[at] = *p;
    half = leaf->n >> 1; /* where a split cuts (``leaf`` may move in it) */
    if (leaf->n <= 2 * LOAD)
        count(o, at, 1);
    else if (split(o, at) < 0) {
        PyErr_Clear(); /* no memory to split: a long leaf is still valid */
        count(o, at, 1);
    }
    else if (idx >= half) {
        at++;
        idx -= half;
    }
    return before(o, at) + idx;
}

/* Remove the entry of prefix ``p`` whose key equals ``key``: 0, or -1 with ValueError. */
static int
take(Order *o, PyObject *key, const Prefix *p)
{
    Py_ssize_t at = find_leaf(o, p, 0), idx;
    Leaf *leaf;
    PyObject *held;
    if (at == o->nleaves)
        goto missing;
    leaf = &o->leaves[at];
    idx = find_entry(leaf, p, 0);
    if (idx == leaf->n || !same(&leaf->e[idx].p, p))
        goto missing;
    held = leaf->e[idx].key;
    if (held != key) {
        int equal = PyObject_RichCompareBool(held, key, Py_EQ);
        if (equal < 0)
            return -1;
        if (!equal)
            goto missing;
    }
    memmove(&leaf->e[idx], &leaf->e[idx + 1], (leaf->n - idx - 1) * sizeof(Entry));
    leaf->n--;
    o->len--;
    if (leaf->n == 0) {
        close_leaf(o, at);
    }
    else {
        if (idx == leaf->n)
            o->maxes[at] = leaf->e[leaf->n - 1].p;
        if (leaf->n >= LOAD / 2 || o->nleaves == 1 || merge(o, at) < 0)
            count(o, at, -1);
    }
    Py_DECREF(held);
    return 0;
missing:
    PyErr_SetString(PyExc_ValueError, "key not in the order");
    return -1;
}

static PyObject *
Order_insert(Order *o, PyObject *key)
{
    Prefix p;
    Py_ssize_t position;
    if (storable(key, &p) < 0)
        return NULL;
    position = put(o, key, &p);
    if (position < 0)
        return NULL;
    return PyLong_FromSsize_t(o->len - position);
}

static PyObject *
Order_add(Order *o, PyObject *key)
{
    Prefix p;
    if (storable(key, &p) < 0 || put(o, key, &p) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Order_remove(Order *o, PyObject *key)
{
    Prefix p;
    if (storable(key, &p) < 0)
        return NULL;
    if (take(o, key, &p) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Order_move(Order *o, PyObject *const *args, Py_ssize_t nargs)
{
    Prefix old, new;
    Py_ssize_t position;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "move(old, new) takes two keys");
        return NULL;
    }
    if (storable(args[0], &old) < 0 || storable(args[1], &new) < 0)
        return NULL;
    if (take(o, args[0], &old) < 0)
        return NULL;
    position = put(o, args[1], &new);
    if (position < 0)
        return NULL;
    return PyLong_FromSsize_t(o->len - position);
}

static Py_ssize_t
bisect(Order *o, PyObject *key, int strict)
{
    Prefix p;
    int sign;
    Py_ssize_t at;
    int r = prefix_of(key, &p, &sign);
    if (r < 0)
        return -1;
    if (r == 1)
        return sign < 0 ? 0 : o->len;
    at = find_leaf(o, &p, strict);
    if (at == o->nleaves)
        return o->len;
    return before(o, at) + find_entry(&o->leaves[at], &p, strict);
}

static PyObject *
Order_bisect_left(Order *o, PyObject *key)
{
    Py_ssize_t i = bisect(o, key, 0);
    return i < 0 ? NULL : PyLong_FromSsize_t(i);
}

static PyObject *
Order_bisect_right(Order *o, PyObject *key)
{
    Py_ssize_t i = bisect(o, key, 1);
    return i < 0 ? NULL : PyLong_FromSsize_t(i);
}

/* The keys at positions [start, stop) ascending, as a new list. */
static PyObject *
keys_between(Order *o, Py_ssize_t start, Py_ssize_t stop)
{
    PyObject *list;
    Py_ssize_t at, j = 0, i = 0;
    if (start < 0)
        start = 0;
    if (stop > o->len)
        stop = o->len;
    if (stop < start)
        stop = start;
    list = PyList_New(stop - start);
    if (list == NULL || stop == start)
        return list;
    for (at = locate(o, start, &j); i < stop - start; at++, j = 0) {
        Leaf *leaf = &o->leaves[at];
        for (; j < leaf->n && i < stop - start; j++, i++) {
            Py_INCREF(leaf->e[j].key);
            PyList_SET_ITEM(list, i, leaf->e[j].key);
        }
    }
    return list;
}

static PyObject *
Order_islice(Order *o, PyObject *args, PyObject *kwargs)
{
    static char *names[] = {"start", "stop", "reverse", NULL};
    Py_ssize_t start = 0, stop = PY_SSIZE_T_MAX;
    int reverse = 0;
    PyObject *list, *iter;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|nnp:islice", names, &start, &stop, &reverse))
        return NULL;
    list = keys_between(o, start, stop);
    if (list == NULL)
        return NULL;
    if (reverse && PyList_Reverse(list) < 0) {
        Py_DECREF(list);
        return NULL;
    }
    iter = PyObject_GetIter(list);
    Py_DECREF(list);
    return iter;
}

static void
clear(Order *o)
{
    Py_ssize_t at, j;
    for (at = 0; at < o->nleaves; at++) {
        for (j = 0; j < o->leaves[at].n; j++)
            Py_DECREF(o->leaves[at].e[j].key);
        PyMem_Free(o->leaves[at].e);
    }
    o->nleaves = 0;
    o->len = 0;
    o->stale = 1;
}

/* Fill an empty order from ``sorted_keys`` (a list in ascending order), taking over the list's
 * references to them: the list is left holding none (NULL items), so neither the filling nor
 * the list's end touches each key again, and each key's prefix goes straight into its leaf (at
 * ten million keys every extra pass over the ints or array of prefixes cost a fraction of a
 * second in cache misses and fresh pages). 0, or -1 with the order left empty. */
static int
build(Order *o, PyObject *sorted_keys)
{
    Py_ssize_t n = PyList_GET_SIZE(sorted_keys), leaves = (n + LOAD - 1) / LOAD, at, k = 0, j;
    PyObject **items = ((PyListObject *)sorted_keys)->ob_item;
    if (reserve_leaves(o, leaves) < 0)
        return -1;
    for (at = 0; at < leaves; at++) {
        Leaf *leaf = &o->leaves[at];
        Py_ssize_t size = n - k < LOAD ? n - k : LOAD;
        leaf->n = leaf->cap = 0;
        leaf->e = NULL;
        if (size_leaf(leaf, size, 1) < 0)
            goto fail;
        for (j = 0; j < size; j++, k++) {
            Entry *e = &leaf->e[j];
            if (storable(items[k], &e->p) < 0)
                goto fail;
            if (k && !less(j ? &leaf->e[j - 1].p : &o->maxes[at - 1], &e->p)) {
                PyErr_SetString(PyExc_ValueError, "two keys with the same score and seq");
                goto fail;
            }
            e->key = items[k];
        }
        leaf->n = size;
        o->maxes[at] = leaf->e[size - 1].p;
    }
    memset(items, 0, n * sizeof(PyObject *));
    o->nleaves = leaves;
    o->len = n;
    o->stale = 1;
    return 0;
fail:
    for (j = 0; j <= at && j < leaves; j++) /* their keys are still the list's */
        PyMem_Free(o->leaves[j].e);
    return -1;
}

static PyObject *
Order_update(Order *o, PyObject *iterable)
{
    PyObject *keys = PySequence_List(iterable);
    Py_ssize_t n, i;
    if (keys == NULL)
        return NULL;
    n = PyList_GET_SIZE(keys);
    if (o->len > 0) {
        for (i = 0; i < n; i++) {
            PyObject *r = Order_add(o, PyList_GET_ITEM(keys, i));
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
    }
    else if (PyList_Sort(keys) < 0 || build(o, keys) < 0)
        goto fail;
    Py_DECREF(keys);
    Py_RETURN_NONE;
fail:
    Py_DECREF(keys);
    return NULL;
}

static PyObject *
Order_check(Order *o, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t at, j, total = 0;
    const Prefix *last = NULL;
    for (at = 0; at < o->nleaves; at++) {
        Leaf *leaf = &o->leaves[at];
        if (leaf->n < 1 || leaf->n > 2 * LOAD || leaf->n > leaf->cap)
            return PyErr_Format(PyExc_AssertionError, "leaf %zd holds %zd keys", at, leaf->n);
        for (j = 0; j < leaf->n; j++) {
            Prefix p;
            if (storable(leaf->e[j].key, &p) < 0 || !same(&p, &leaf->e[j].p))
                return PyErr_Format(PyExc_AssertionError, "leaf %zd entry %zd: prefix of another key", at, j);
            if (last != NULL && !less(last, &leaf->e[j].p))
                return PyErr_Format(PyExc_AssertionError, "leaf %zd entry %zd out of order", at, j);
            last = &leaf->e[j].p;
        }
        if (!same(&o->maxes[at], last))
            return PyErr_Format(PyExc_AssertionError, "leaf %zd: its max is not its last key", at);
        if (before(o, at) != total)
            return PyErr_Format(PyExc_AssertionError, "leaf %zd: %zd keys before it, the tree says %zd",
                                at, total, before(o, at));
        total += leaf->n;
    }
    if (total != o->len)
        return PyErr_Format(PyExc_AssertionError, "%zd keys held, the length says %zd", total, o->len);
    Py_RETURN_NONE;
}

static Py_ssize_t
Order_length(Order *o)
{
    return o->len;
}

static PyObject *
Order_iter(Order *o)
{
    PyObject *list = keys_between(o, 0, o->len), *iter;
    if (list == NULL)
        return NULL;
    iter = PyObject_GetIter(list);
    Py_DECREF(list);
    return iter;
}

/* ``order[start:stop]``: the keys at those positions ascending, as a list (step 1 only). */
static PyObject *
Order_subscript(Order *o, PyObject *item)
{
    Py_ssize_t start, stop, step;
    if (!PySlice_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "an Order is sliced, not indexed");
        return NULL;
    }
    if (PySlice_Unpack(item, &start, &stop, &step) < 0)
        return NULL;
    if (step != 1) {
        PyErr_SetString(PyExc_ValueError, "an Order slice has no step");
        return NULL;
    }
    PySlice_AdjustIndices(o->len, &start, &stop, step);
    return keys_between(o, start, stop);
}

static PyObject *
Order_sizeof(Order *o, PyObject *Py_UNUSED(ignored))
{
    Py_ssize_t size = sizeof(Order) + o->capleaves * (sizeof(Leaf) + sizeof(Prefix) + sizeof(Py_ssize_t)), at;
    for (at = 0; at < o->nleaves; at++)
        size += o->leaves[at].cap * sizeof(Entry);
    return PyLong_FromSsize_t(size);
}

static PyObject *
Order_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Order *o;
    if (PyTuple_GET_SIZE(args) || (kwargs && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "Order() takes no arguments");
        return NULL;
    }
    o = (Order *)type->tp_alloc(type, 0);
    if (o == NULL)
        return NULL;
    o->stale = 1;
    return (PyObject *)o;
}

static void
Order_dealloc(Order *o)
{
    clear(o);
    PyMem_Free(o->leaves);
    PyMem_Free(o->maxes);
    PyMem_Free(o->tree);
    Py_TYPE(o)->tp_free((PyObject *)o);
}

static PyMethodDef Order_methods[] = {
    {"insert", (PyCFunction)Order_insert, METH_O, "Add a key; its rank from the largest key (1 = largest)."},
    {"move", (PyCFunction)(void (*)(void))Order_move, METH_FASTCALL,
     "move(old, new): replace a held key; the rank of the new one."},
    {"add", (PyCFunction)Order_add, METH_O, "Add a key."},
    {"remove", (PyCFunction)Order_remove, METH_O, "Remove a held key (ValueError if it is not held)."},
    {"update", (PyCFunction)Order_update, METH_O, "Add many keys (one sort and a build when empty)."},
    {"bisect_left", (PyCFunction)Order_bisect_left, METH_O, "The number of held keys below ``key``."},
    {"bisect_right", (PyCFunction)Order_bisect_right, METH_O, "The number of held keys up to ``key``."},
    {"islice", (PyCFunction)(void (*)(void))Order_islice, METH_VARARGS | METH_KEYWORDS,
     "islice(start=0, stop=len, reverse=False): an iterator over the keys at those positions."},
    {"_check", (PyCFunction)Order_check, METH_NOARGS, "Raise AssertionError if an invariant is broken."},
    {"__sizeof__", (PyCFunction)Order_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Order_as_sequence = {
    .sq_length = (lenfunc)Order_length,
};

static PyMappingMethods Order_as_mapping = {
    .mp_length = (lenfunc)Order_length,
    .mp_subscript = (binaryfunc)Order_subscript,
};

static PyTypeObject OrderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "stagetx.stages.index._order.Order",
    .tp_basicsize = sizeof(Order),
    .tp_dealloc = (destructor)Order_dealloc,
    .tp_as_sequence = &Order_as_sequence,
    .tp_as_mapping = &Order_as_mapping,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The dense keys of one tier in ascending order, ranked in O(log n).",
    .tp_iter = (getiterfunc)Order_iter,
    .tp_methods = Order_methods,
    .tp_new = Order_new,
};

/* take_columns(keys, start, stop, slots, values) -> (members, values, renumbered): the snapshot
 * chunk of the dense keys keys[start:stop] (board._dense_chunks), taken out of copies made for
 * the snapshot. The low 32 bits of a key name its member's slot: the member and value there move
 * into the chunk (None is left in ``slots`` and ``values``), the key leaves ``keys`` (None left)
 * and comes back with its position in ``keys`` as its slot, which a load hands out. The copies
 * are so let go of chunk by chunk rather than at the compaction's end (one scattered reference
 * count per member and copy, all at once: a pause of a few hundred ms at ten million members).
 * In C to spare the compaction a Python step and two int allocations per member and column. */
static PyObject *
take_columns(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *keys, *slots, *values, *members = NULL, *found = NULL, *renumbered = NULL;
    Py_ssize_t start, stop, n, i;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "take_columns(keys, start, stop, slots, values)");
        return NULL;
    }
    keys = args[0];
    slots = args[3];
    values = args[4];
    if (!PyList_CheckExact(keys) || !PyList_CheckExact(slots) || !PyList_CheckExact(values)) {
        PyErr_SetString(PyExc_TypeError, "take_columns: keys, slots and values must be lists");
        return NULL;
    }
    start = PyLong_AsSsize_t(args[1]);
    stop = PyLong_AsSsize_t(args[2]);
    if ((start == -1 || stop == -1) && PyErr_Occurred())
        return NULL;
    if (start < 0 || stop < start) {
        PyErr_SetString(PyExc_ValueError, "take_columns: 0 <= start <= stop");
        return NULL;
    }
    if (stop > PyList_GET_SIZE(keys))
        stop = PyList_GET_SIZE(keys);
    if (start > stop)
        start = stop;
    if (stop > ((Py_ssize_t)1 << 32)) {
        PyErr_SetString(PyExc_OverflowError, "take_columns: positions past 2**32 do not fit a slot");
        return NULL;
    }
    n = stop - start;
    members = PyList_New(n);
    found = PyList_New(n);
    renumbered = PyList_New(n);
    if (members == NULL || found == NULL || renumbered == NULL)
        goto fail;
    for (i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, start + i), *member, *flip, *moved;
        unsigned long long slot;
        if (!PyLong_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "take_columns: keys must be ints (not taken before)");
            goto fail;
        }
        slot = PyLong_AsUnsignedLongLongMask(key); /* two's complement: the low bits as ``key & mask`` */
        if (slot == (unsigned long long)-1 && PyErr_Occurred())
            goto fail;
        slot &= 0xffffffffULL;
        if ((Py_ssize_t)slot >= PyList_GET_SIZE(slots) || (Py_ssize_t)slot >= PyList_GET_SIZE(values) ||
            (member = PyList_GET_ITEM(slots, slot)) == Py_None) {
            PyErr_Format(PyExc_IndexError, "take_columns: slot %llu of a key has no member", slot);
            goto fail;
        }
        flip = PyLong_FromUnsignedLongLong(slot ^ (unsigned long long)(start + i));
        if (flip == NULL)
            goto fail;
        moved = PyNumber_Xor(key, flip); /* the low 32 bits replaced by the position */
        Py_DECREF(flip);
        if (moved == NULL)
            goto fail;
        PyList_SET_ITEM(renumbered, i, moved);
        PyList_SET_ITEM(members, i, member); /* the copies' references move into the chunk */
        PyList_SET_ITEM(slots, slot, Py_NewRef(Py_None));
        PyList_SET_ITEM(found, i, PyList_GET_ITEM(values, slot));
        PyList_SET_ITEM(values, slot, Py_NewRef(Py_None));
        PyList_SET_ITEM(keys, start + i, Py_NewRef(Py_None));
        Py_DECREF(key);
    }
    return Py_BuildValue("(NNN)", members, found, renumbered);
fail:
    Py_XDECREF(members);
    Py_XDECREF(found);
    Py_XDECREF(renumbered);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"take_columns", (PyCFunction)(void (*)(void))take_columns, METH_FASTCALL,
     "take_columns(keys, start, stop, slots, values): (members, values, keys renumbered) of a snapshot chunk, "
     "taken out of the lists."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "stagetx.stages.index._order",
    .m_doc = "The ranked dense keys of a scoreboard tier (see board.DenseTier), and their snapshot chunks.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__order(void)
{
    PyObject *m;
    if (PyType_Ready(&OrderType) < 0)
        return NULL;
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&OrderType);
    if (PyModule_AddObject(m, "Order", (PyObject *)&OrderType) < 0) {
        Py_DECREF(&OrderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
