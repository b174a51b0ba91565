/* The book's native state and its steady-state loop (book/native.py's NativeBookBuilder
 * holds one): the two sides, the output rows (level changes, top of book, trades,
 * bookTickers), applying a synced diff, loading a snapshot, and book_run over the
 * scanner's records (rec_t, book_native.h).
 *
 * The loop stops at every message that needs the book's control logic (a snapshot, a
 * diff while no book is synced or one that breaks the chain, a PY record, any price while
 * a snapshot awaits its plausibility check); Python handles that one message and calls
 * back in.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "book_native.h"

/* One side as a sorted array, best level LAST: keys are prices for bids and negated
 * prices for asks, ascending. Changes cluster at the touch, so inserts and deletes move
 * few entries. */
typedef struct {
    double *key, *qty;
    int64_t n, cap;
} side_t;

/* A level change; what all changes of one diff (or snapshot) share is in its group: at
 * 32 + 32/levels bytes a change instead of 56, which matters because writing fresh
 * memory is half of the loop's time. */
typedef struct {
    double price, old_qty, new_qty;
    uint32_t group;
    int8_t side, pad[3];
} event_t;

typedef struct {
    int64_t time_ns, update_id;
    double mid;
    int8_t has_mid, from_snapshot, pad[6];
} group_t;

typedef struct {
    int64_t time_ns, exchange_time_ms, update_id;
    double bid_px, bid_qty, ask_px, ask_qty, bid_depth_5, ask_depth_5, bid_depth_10,
        ask_depth_10;
    int8_t has_exchange_time, pad[7];
} top_t;

typedef struct {
    int64_t time_ns, trade_time_ms, trade_id;
    double price, qty;
    int8_t is_buyer_maker, pad[7];
} trade_t;

typedef struct {
    int64_t time_ns, update_id;
    double bid_px, bid_qty, ask_px, ask_qty;
} ticker_t;

/* What Python reads and writes between calls (mirrored by a ctypes Structure). */
typedef struct {
    int64_t market_um, synced, last_u, unverified, has_ref, scale;
    double ref_price;
    int64_t diffs, diffs_applied, diffs_stale, crossed_after_diff, oom;
} state_t;

typedef struct {
    state_t st;
    side_t bids, asks;
    event_t *ev;
    int64_t nev, evcap;
    group_t *gr;
    int64_t ngr, grcap;
    top_t *top;
    int64_t ntop, topcap;
    trade_t *tr;
    int64_t ntr, trcap;
    ticker_t *tk;
    int64_t ntk, tkcap;
} book_t;

book_t *book_new(int64_t market_um) {
    book_t *b = calloc(1, sizeof(book_t));
    if (b) b->st.market_um = market_um;
    return b;
}

void book_free(book_t *b) {
    if (!b) return;
    free(b->bids.key);
    free(b->bids.qty);
    free(b->asks.key);
    free(b->asks.qty);
    free(b->ev);
    free(b->gr);
    free(b->top);
    free(b->tr);
    free(b->tk);
    free(b);
}

state_t *book_state(book_t *b) { return &b->st; }
const event_t *book_events(const book_t *b, int64_t *n) { *n = b->nev; return b->ev; }
const group_t *book_groups(const book_t *b, int64_t *n) { *n = b->ngr; return b->gr; }
const top_t *book_tops(const book_t *b, int64_t *n) { *n = b->ntop; return b->top; }
const trade_t *book_trades(const book_t *b, int64_t *n) { *n = b->ntr; return b->tr; }
const ticker_t *book_tickers(const book_t *b, int64_t *n) { *n = b->ntk; return b->tk; }
int64_t book_sizes(const book_t *b, int64_t *out4) {
    out4[0] = b->nev; out4[1] = b->ntop; out4[2] = b->ntr; out4[3] = b->ntk;
    return b->bids.n + b->asks.n;
}

void book_truncate(book_t *b, int64_t n_events, int64_t n_top) {
    if (n_events >= 0 && n_events < b->nev) b->nev = n_events;
    if (n_top >= 0 && n_top < b->ntop) b->ntop = n_top;
}

void book_clear(book_t *b) { b->bids.n = b->asks.n = 0; }

#define NEAR_TOUCH 32

static inline int64_t lower_bound(const side_t *s, double key) {
    /* the first index whose key is >= key. Most changes sit within a few levels of the
     * touch (the end): walk back over the last NEAR_TOUCH keys (one mispredicted branch
     * instead of one per bisection step), then bisect the rest. */
    int64_t n = s->n, lim = n > NEAR_TOUCH ? n - NEAR_TOUCH : 0, i = n;
    const double *k = s->key;
    while (i > lim && k[i - 1] >= key) i--;
    if (i > lim || i == 0) return i;
    int64_t lo = 0, hi = i; /* k[i] >= key */
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (k[mid] < key) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static int side_reserve(side_t *s, int64_t need) {
    if (need <= s->cap) return 0;
    int64_t c = s->cap ? s->cap : 1024;
    while (c < need) c *= 2;
    double *k = realloc(s->key, (size_t)c * sizeof(double));
    if (!k) return -1;
    s->key = k;
    double *q = realloc(s->qty, (size_t)c * sizeof(double));
    if (!q) return -1;
    s->qty = q;
    s->cap = c;
    return 0;
}

static inline double best_price(const side_t *s, int is_bid) {
    double k = s->key[s->n - 1];
    return is_bid ? k : -k;
}

static inline int mid_of(const book_t *b, double *mid) {
    if (!b->bids.n || !b->asks.n) return 0;
    *mid = 0.5 * (best_price(&b->bids, 1) + best_price(&b->asks, 0));
    return 1;
}

/* The group the next level changes belong to. */
static inline int push_group(book_t *b, int64_t t, int64_t id, double mid, int has_mid,
                             int snap) {
    if (b->ngr >= (int64_t)UINT32_MAX) return -1;
    if (grow((void **)&b->gr, &b->grcap, b->ngr + 1, sizeof(group_t))) return -1;
    group_t *g = b->gr + b->ngr++;
    g->time_ns = t;
    g->update_id = id;
    g->mid = has_mid ? mid : NAN;
    g->has_mid = (int8_t)has_mid;
    g->from_snapshot = (int8_t)snap;
    return 0;
}

static inline int push_event(book_t *b, int side, double px, double old, double q) {
    if (grow((void **)&b->ev, &b->evcap, b->nev + 1, sizeof(event_t))) return -1;
    event_t *ev = b->ev + b->nev++;
    ev->price = px;
    ev->old_qty = old;
    ev->new_qty = q;
    ev->group = (uint32_t)(b->ngr - 1);
    ev->side = (int8_t)side;
    return 0;
}

/* One level change as rebuild.BookBuilder._apply does it. */
static inline int apply_level(book_t *b, int is_bid, double px, double q) {
    side_t *s = is_bid ? &b->bids : &b->asks;
    double key = is_bid ? px : -px;
    int64_t i = lower_bound(s, key);
    int found = i < s->n && s->key[i] == key;
    double old = found ? s->qty[i] : 0.0;
    if (q == old) return 0;
    if (q > 0) {
        if (found) {
            s->qty[i] = q;
        } else {
            if (side_reserve(s, s->n + 1)) return -1;
            memmove(s->key + i + 1, s->key + i, (size_t)(s->n - i) * sizeof(double));
            memmove(s->qty + i + 1, s->qty + i, (size_t)(s->n - i) * sizeof(double));
            s->key[i] = key;
            s->qty[i] = q;
            s->n++;
        }
    } else if (found) {
        memmove(s->key + i, s->key + i + 1, (size_t)(s->n - i - 1) * sizeof(double));
        memmove(s->qty + i, s->qty + i + 1, (size_t)(s->n - i - 1) * sizeof(double));
        s->n--;
    }
    return push_event(b, is_bid ? 1 : -1, px, old, q);
}

/* size at the touch and depth over the best 5 and 10 levels, added from the touch out in
 * the order rebuild._depths adds them */
static inline void depth(const side_t *s, double *q1, double *d5, double *d10) {
    double total = 0.0, five = 0.0;
    int64_t k = 0;
    for (; k < 10 && k < s->n; k++) {
        total += s->qty[s->n - 1 - k];
        if (k == 4) five = total;
    }
    if (k < 5) five = total;
    *q1 = s->n ? s->qty[s->n - 1] : 0.0;
    *d5 = five;
    *d10 = total;
}

static inline int push_top(book_t *b, int64_t t, int64_t has_e, int64_t e_ms, int64_t id) {
    if (grow((void **)&b->top, &b->topcap, b->ntop + 1, sizeof(top_t))) return -1;
    top_t *row = b->top + b->ntop++;
    row->time_ns = t;
    row->exchange_time_ms = has_e ? e_ms : 0;
    row->has_exchange_time = (int8_t)(has_e != 0);
    row->update_id = id;
    int nb = b->bids.n != 0, na = b->asks.n != 0;
    row->bid_px = nb ? best_price(&b->bids, 1) : NAN;
    row->ask_px = na ? best_price(&b->asks, 0) : NAN;
    if (nb && na && row->bid_px >= row->ask_px) b->st.crossed_after_diff++;
    depth(&b->bids, &row->bid_qty, &row->bid_depth_5, &row->bid_depth_10);
    depth(&b->asks, &row->ask_qty, &row->ask_depth_5, &row->ask_depth_10);
    return 0;
}

/* A diff's level changes (pairs), then its top-of-book row; last_u and the count move. */
int book_apply(book_t *b, const double *bid_lv, int64_t nb, const double *ask_lv, int64_t na,
               int64_t t, int64_t last, int64_t has_e, int64_t e_ms) {
    double mid = 0.0;
    int has_mid = mid_of(b, &mid);
    if (push_group(b, t, last, mid, has_mid, 0)) goto oom;
    for (int64_t k = 0; k < nb; k++)
        if (apply_level(b, 1, bid_lv[2 * k], bid_lv[2 * k + 1])) goto oom;
    for (int64_t k = 0; k < na; k++)
        if (apply_level(b, 0, ask_lv[2 * k], ask_lv[2 * k + 1])) goto oom;
    b->st.last_u = last;
    b->st.diffs_applied++;
    if (push_top(b, t, has_e, e_ms, last)) goto oom;
    return 0;
oom:
    b->st.oom = 1;
    return -1;
}

static int cmp_key(const void *x, const void *y) {
    double a = *(const double *)x, c = *(const double *)y;
    return (a > c) - (a < c);
}

/* Snapshot levels (pairs, in the message's order) into one side, as
 * SortedDict((p, q) for p, q in levels if q > 0) builds it: sizes <= 0 are left out, then
 * the last pair of a repeated price wins. */
static int load_side(side_t *s, const double *lv, int64_t n, int is_bid) {
    s->n = 0;
    if (side_reserve(s, n + 1)) return -1;
    double *tmp = malloc((size_t)(n ? n : 1) * 2 * sizeof(double)); /* (key, index) */
    if (!tmp) return -1;
    int64_t m = 0;
    for (int64_t k = 0; k < n; k++) {
        if (!(lv[2 * k + 1] > 0)) continue;
        tmp[2 * m] = is_bid ? lv[2 * k] : -lv[2 * k];
        tmp[2 * m + 1] = (double)k;
        m++;
    }
    qsort(tmp, (size_t)m, 2 * sizeof(double), cmp_key);
    for (int64_t k = 0; k < m;) {
        int64_t j = k, last = (int64_t)tmp[2 * k + 1];
        while (j + 1 < m && tmp[2 * (j + 1)] == tmp[2 * k]) {
            j++;
            if ((int64_t)tmp[2 * j + 1] > last) last = (int64_t)tmp[2 * j + 1];
        }
        s->key[s->n] = tmp[2 * k];
        s->qty[s->n] = lv[2 * last + 1];
        s->n++;
        k = j + 1;
    }
    free(tmp);
    return 0;
}

/* A snapshot's book, and its levels as level-change rows (bids, then asks, each by
 * ascending price: SortedDict order). */
int book_load_snapshot(book_t *b, const double *bid_lv, int64_t nb, const double *ask_lv,
                       int64_t na, int64_t t, int64_t last_id) {
    if (load_side(&b->bids, bid_lv, nb, 1) || load_side(&b->asks, ask_lv, na, 0)) goto oom;
    double mid = 0.0;
    int has_mid = mid_of(b, &mid);
    if (push_group(b, t, last_id, mid, has_mid, 1)) goto oom;
    for (int64_t k = 0; k < b->bids.n; k++)
        if (push_event(b, 1, b->bids.key[k], 0.0, b->bids.qty[k])) goto oom;
    for (int64_t k = b->asks.n - 1; k >= 0; k--)
        if (push_event(b, -1, -b->asks.key[k], 0.0, b->asks.qty[k])) goto oom;
    return 0;
oom:
    b->st.oom = 1;
    return -1;
}

int book_add_trade(book_t *b, int64_t t, int64_t trade_ms, int64_t trade_id, double px,
                   double q, int64_t buyer_maker) {
    if (grow((void **)&b->tr, &b->trcap, b->ntr + 1, sizeof(trade_t))) { b->st.oom = 1; return -1; }
    trade_t *row = b->tr + b->ntr++;
    row->time_ns = t;
    row->trade_time_ms = trade_ms;
    row->trade_id = trade_id;
    row->price = px;
    row->qty = q;
    row->is_buyer_maker = (int8_t)(buyer_maker != 0);
    return 0;
}

int book_add_ticker(book_t *b, int64_t t, int64_t u, double bp, double bq, double ap,
                    double aq) {
    if (grow((void **)&b->tk, &b->tkcap, b->ntk + 1, sizeof(ticker_t))) { b->st.oom = 1; return -1; }
    ticker_t *row = b->tk + b->ntk++;
    row->time_ns = t;
    row->update_id = u;
    row->bid_px = bp;
    row->bid_qty = bq;
    row->ask_px = ap;
    row->ask_qty = aq;
    return 0;
}

/* Records [i, n) of a scan through the book while nothing needs Python; returns the index
 * of the first record Python must handle (n when none). SKIP records are passed over
 * (Python reports them in line order). */
int64_t book_run(book_t *b, const rec_t *recs, const double *lv, int64_t i, int64_t n) {
    state_t *st = &b->st;
    for (; i < n; i++) {
        const rec_t *r = recs + i;
        int64_t t = r->stamp * st->scale;
        switch (r->kind) {
        case K_SKIP:
            continue;
        case K_DIFF: {
            if (!st->synced || (st->market_um && !(r->flags & F_PU))) return i;
            int64_t last = r->b;
            if (last <= st->last_u) {
                st->diffs++;
                st->diffs_stale++;
                continue;
            }
            int cont = st->market_um ? r->c == st->last_u : r->a == st->last_u + 1;
            if (!cont) return i;
            st->diffs++;
            if (book_apply(b, lv + 2 * r->lvb, r->nb, lv + 2 * r->lva, r->na, t, last,
                           r->flags & F_E, r->d))
                return i;
            continue;
        }
        case K_TRADE:
            if (st->unverified) return i;
            if (book_add_trade(b, t, r->a, r->b, r->x0, r->x1, r->flags & F_M)) return i;
            st->has_ref = 1;
            st->ref_price = r->x0;
            continue;
        case K_TICKER:
            if (st->unverified) return i;
            if (book_add_ticker(b, t, r->a, r->x0, r->x1, r->x2, r->x3)) return i;
            st->has_ref = 1;
            st->ref_price = 0.5 * (r->x0 + r->x2);
            continue;
        default: /* snapshots and PY records */
            return i;
        }
    }
    return n;
}
