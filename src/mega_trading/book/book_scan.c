/* The book's capture scanner (book/native_scan.py drives it): lines "<stamp> <json>" of a
 * capture block straight into numeric records (rec_t, book_native.h), their level pairs,
 * and the bytes of every line it does not type.
 *
 * Exactness, not a second opinion: the scanner only types a line it fully understands
 * (a strict subset of JSON: ASCII strings without escapes, known keys once each, integers
 * that fit int64, decimal strings "-?d+(.d+)?"; book_json.h). Every other line becomes a
 * PY record whose bytes go back to Python, which decodes it with the same code as the
 * pure-Python path.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "book_json.h"
#include "book_native.h"

enum { R_NO_TIME = 1, R_UNUSED_STREAM = 2 };

#define MAX_SYMS 16
#define SYM_LEN 32

typedef struct {
    rec_t *recs;
    int64_t n, cap;
    double *lv; /* price, qty pairs */
    int64_t nlv, lvcap;
    char *py;
    int64_t npy, pycap;
    int64_t line_no;
    int32_t nsym;
    char syms[MAX_SYMS][SYM_LEN];
    int32_t oom;
} scan_t;

scan_t *scan_new(void) { return calloc(1, sizeof(scan_t)); }

void scan_free(scan_t *s) {
    if (!s) return;
    free(s->recs);
    free(s->lv);
    free(s->py);
    free(s);
}

void scan_reset(scan_t *s) { s->n = s->nlv = s->npy = 0; }

int64_t scan_count(const scan_t *s) { return s->n; }
int64_t scan_lines(const scan_t *s) { return s->line_no; }
void scan_set_lines(scan_t *s, int64_t n) { s->line_no = n; }
const rec_t *scan_records(const scan_t *s) { return s->recs; }
const double *scan_levels(const scan_t *s) { return s->lv; }
int64_t scan_level_count(const scan_t *s) { return s->nlv; }
const char *scan_py(const scan_t *s) { return s->py; }
int32_t scan_symbol_count(const scan_t *s) { return s->nsym; }
const char *scan_symbol(const scan_t *s, int32_t i) { return s->syms[i]; }
int32_t scan_oom(const scan_t *s) { return s->oom; }
int64_t scan_record_size(void) { return (int64_t)sizeof(rec_t); }

/* [[ "p", "q" ], ...] into the level pairs; *count set. */
static const char *plevels(scan_t *sc, const char *p, const char *e, int64_t *first,
                           int32_t *count) {
    p = ws(p, e);
    if (p >= e || *p != '[') return NULL;
    *first = sc->nlv;
    int32_t k = 0;
    p = ws(p + 1, e);
    if (p < e && *p == ']') { *count = 0; return p + 1; }
    for (;;) {
        p = ws(p, e);
        if (p >= e || *p != '[') return NULL;
        if (grow((void **)&sc->lv, &sc->lvcap, 2 * (sc->nlv + 1), sizeof(double))) {
            sc->oom = 1;
            return NULL;
        }
        double *slot = sc->lv + 2 * sc->nlv;
        p = pdecq(ws(p + 1, e), e, slot);
        if (!p) return NULL;
        p = ws(p, e);
        if (p >= e || *p != ',') return NULL;
        p = pdecq(ws(p + 1, e), e, slot + 1);
        if (!p) return NULL;
        p = ws(p, e);
        if (p >= e || *p != ']') return NULL;
        p++;
        sc->nlv++;
        k++;
        p = ws(p, e);
        if (p < e && *p == ',') { p++; continue; }
        if (p < e && *p == ']') { *count = k; return p + 1; }
        return NULL;
    }
}

static inline int key_is(const char *k, int64_t n, const char *lit) {
    int64_t m = (int64_t)strlen(lit);
    return n == m && memcmp(k, lit, (size_t)m) == 0;
}

static int intern(scan_t *sc, const char *s, int64_t n) {
    if (n >= SYM_LEN) return -2;
    for (int i = 0; i < sc->nsym; i++)
        if ((int64_t)strlen(sc->syms[i]) == n && memcmp(sc->syms[i], s, (size_t)n) == 0)
            return i;
    if (sc->nsym >= MAX_SYMS) return -2;
    memcpy(sc->syms[sc->nsym], s, (size_t)n);
    sc->syms[sc->nsym][n] = 0;
    return sc->nsym++;
}

/* bits of the keys seen, so that a repeated key sends the line to Python */
enum { S_U = 1, S_u = 2, S_pu = 4, S_E = 8, S_s = 16, S_b = 32, S_a = 64, S_B = 128,
       S_A = 256, S_p = 512, S_q = 1024, S_T = 2048, S_t = 4096, S_m = 8192 };

#define SEEN(bit)                        \
    do {                                 \
        if (seen & (bit)) return NULL;   \
        seen |= (bit);                   \
    } while (0)

/* A diff / trade / bookTicker "data" object into r. */
static const char *pdata(scan_t *sc, const char *p, const char *e, int kind, rec_t *r) {
    p = ws(p, e);
    if (p >= e || *p != '{') return NULL;
    p = ws(p + 1, e);
    unsigned seen = 0;
    if (p < e && *p == '}') { p++; goto done; }
    for (;;) {
        const char *k, *s;
        int64_t kn, n;
        p = pstr(ws(p, e), e, &k, &kn);
        if (!p) return NULL;
        p = ws(p, e);
        if (p >= e || *p != ':') return NULL;
        p = ws(p + 1, e);
        if (key_is(k, kn, "s")) {
            SEEN(S_s);
            p = pstr(p, e, &s, &n);
            if (!p) return NULL;
            int id = intern(sc, s, n);
            if (id < 0) return NULL;
            r->sym = id;
        } else if (kind == K_DIFF) {
            if (key_is(k, kn, "U")) { SEEN(S_U); p = pint(p, e, &r->a); }
            else if (key_is(k, kn, "u")) { SEEN(S_u); p = pint(p, e, &r->b); }
            else if (key_is(k, kn, "pu")) { SEEN(S_pu); p = pint(p, e, &r->c); r->flags |= F_PU; }
            else if (key_is(k, kn, "E")) { SEEN(S_E); p = pint(p, e, &r->d); r->flags |= F_E; }
            else if (key_is(k, kn, "b")) { SEEN(S_b); p = plevels(sc, p, e, &r->lvb, &r->nb); }
            else if (key_is(k, kn, "a")) { SEEN(S_a); p = plevels(sc, p, e, &r->lva, &r->na); }
            else p = skipv(p, e, 1);
        } else if (kind == K_TRADE) {
            if (key_is(k, kn, "p")) {
                SEEN(S_p);
                p = pstr(p, e, &s, &n);
                if (!p || pdec(s, n, &r->x0)) return NULL;
            } else if (key_is(k, kn, "q")) {
                SEEN(S_q);
                p = pstr(p, e, &s, &n);
                if (!p || pdec(s, n, &r->x1)) return NULL;
            } else if (key_is(k, kn, "T")) { SEEN(S_T); p = pint(p, e, &r->a); }
            else if (key_is(k, kn, "t")) { SEEN(S_t); p = pint(p, e, &r->b); }
            else if (key_is(k, kn, "m")) {
                SEEN(S_m);
                const char *q = plit(p, e, "true", 4);
                if (q) r->flags |= F_M;
                else q = plit(p, e, "false", 5);
                p = q;
            } else p = skipv(p, e, 1);
        } else { /* K_TICKER */
            double *slot = NULL;
            unsigned bit = 0;
            if (key_is(k, kn, "b")) { slot = &r->x0; bit = S_b; }
            else if (key_is(k, kn, "B")) { slot = &r->x1; bit = S_B; }
            else if (key_is(k, kn, "a")) { slot = &r->x2; bit = S_a; }
            else if (key_is(k, kn, "A")) { slot = &r->x3; bit = S_A; }
            if (slot) {
                SEEN(bit);
                p = pstr(p, e, &s, &n);
                if (!p || pdec(s, n, slot)) return NULL;
            } else if (key_is(k, kn, "u")) { SEEN(S_u); p = pint(p, e, &r->a); }
            else if (key_is(k, kn, "E")) { SEEN(S_E); p = skipv(p, e, 1); r->flags |= F_E; }
            else p = skipv(p, e, 1);
        }
        if (!p) return NULL;
        p = ws(p, e);
        if (p < e && *p == ',') { p++; continue; }
        if (p < e && *p == '}') { p++; break; }
        return NULL;
    }
done:
    if (kind == K_DIFF && (seen & (S_U | S_u)) != (S_U | S_u)) return NULL;
    if (kind == K_TRADE && (seen & (S_p | S_q | S_T | S_t | S_m)) != (S_p | S_q | S_T | S_t | S_m))
        return NULL;
    if (kind == K_TICKER && (seen & (S_u | S_b | S_B | S_a | S_A)) != (S_u | S_b | S_B | S_a | S_A))
        return NULL;
    return p;
}

/* The body of one line (after "<stamp> "): returns the kind, fills r; K_PY when unsure. */
static int pbody(scan_t *sc, const char *p, const char *e, rec_t *r) {
    p = ws(p, e);
    if (p >= e || *p != '{') return K_PY;
    p = ws(p + 1, e);
    if (p < e && *p == '}') {
        if (ws(p + 1, e) != e) return K_PY;
        r->reason = R_UNUSED_STREAM; /* {}: neither a stream message nor a snapshot */
        return K_SKIP;
    }
    const char *k, *s;
    int64_t kn, n;
    const char *after_key = pstr(p, e, &k, &kn);
    if (!after_key) return K_PY;
    int stream_mode = key_is(k, kn, "stream");
    int kind = 0, have_data = 0, have_stream = 0, have_id = 0;
    unsigned seen = 0;
    for (int first = 1;; first = 0) {
        if (!first) {
            p = pstr(ws(p, e), e, &k, &kn);
            if (!p) return K_PY;
        } else {
            p = after_key;
        }
        p = ws(p, e);
        if (p >= e || *p != ':') return K_PY;
        p = ws(p + 1, e);
        if (stream_mode) {
            if (key_is(k, kn, "stream")) {
                if (have_stream) return K_PY;
                have_stream = 1;
                p = pstr(p, e, &s, &n);
                if (!p) return K_PY;
                const char *at = memchr(s, '@', (size_t)n);
                const char *suf = at ? at + 1 : s + n;
                int64_t sn = (s + n) - suf;
                if (sn >= 5 && memcmp(suf, "depth", 5) == 0) kind = K_DIFF;
                else if (key_is(suf, sn, "trade")) kind = K_TRADE;
                else if (key_is(suf, sn, "bookTicker")) kind = K_TICKER;
                else kind = -1; /* a stream the book does not use */
            } else if (key_is(k, kn, "data")) {
                if (have_data) return K_PY;
                have_data = 1;
                p = kind > 0 ? pdata(sc, p, e, kind, r) : skipv(p, e, 1);
            } else {
                p = skipv(p, e, 1);
            }
        } else {
            if (key_is(k, kn, "stream")) return K_PY;
            if (key_is(k, kn, "lastUpdateId")) {
                if (seen & S_U) return K_PY;
                seen |= S_U;
                have_id = 1;
                p = pint(p, e, &r->a);
            } else if (key_is(k, kn, "bids")) {
                if (seen & S_b) return K_PY;
                seen |= S_b;
                p = plevels(sc, p, e, &r->lvb, &r->nb);
            } else if (key_is(k, kn, "asks")) {
                if (seen & S_a) return K_PY;
                seen |= S_a;
                p = plevels(sc, p, e, &r->lva, &r->na);
            } else if (key_is(k, kn, "s")) {
                if (seen & S_s) return K_PY;
                seen |= S_s;
                p = pstr(p, e, &s, &n);
                if (p) {
                    int id = intern(sc, s, n);
                    if (id < 0) return K_PY;
                    r->sym = id;
                }
            } else if (key_is(k, kn, "E")) {
                if (seen & S_E) return K_PY;
                seen |= S_E;
                r->flags |= F_E;
                p = skipv(p, e, 1);
            } else {
                p = skipv(p, e, 1);
            }
        }
        if (!p) return K_PY;
        p = ws(p, e);
        if (p < e && *p == ',') { p++; continue; }
        if (p < e && *p == '}') { p++; break; }
        return K_PY;
    }
    if (ws(p, e) != e) return K_PY;
    if (stream_mode) {
        if (kind < 0) { r->reason = R_UNUSED_STREAM; return K_SKIP; }
        return have_data ? kind : K_PY; /* no data object: Python reports it */
    }
    if (!have_id) { r->reason = R_UNUSED_STREAM; return K_SKIP; }
    if ((seen & (S_b | S_a)) != (S_b | S_a)) return K_PY;
    return K_SNAPSHOT;
}

static void scan_line(scan_t *sc, const char *p, const char *e) {
    sc->line_no++;
    if (grow((void **)&sc->recs, &sc->cap, sc->n + 1, sizeof(rec_t))) { sc->oom = 1; return; }
    rec_t *r = sc->recs + sc->n;
    memset(r, 0, sizeof *r);
    r->line = sc->line_no;
    r->sym = -1;
    const char *sp = memchr(p, ' ', (size_t)(e - p));
    int64_t lv_mark = sc->nlv;
    int kind;
    if (!sp || sp == p) {
        kind = K_SKIP;
        r->reason = R_NO_TIME;
    } else {
        uint64_t t = 0;
        int ok = 1;
        for (const char *q = p; q < sp; q++) {
            if (*q < '0' || *q > '9') { ok = 0; break; }
        }
        if (!ok) {
            kind = K_SKIP;
            r->reason = R_NO_TIME;
        } else if (sp - p > 19) {
            kind = K_PY;
        } else {
            for (const char *q = p; q < sp; q++) t = t * 10 + (uint64_t)(*q - '0');
            if (t > (uint64_t)INT64_MAX) kind = K_PY;
            else {
                r->stamp = (int64_t)t;
                kind = pbody(sc, sp + 1, e, r);
            }
        }
    }
    if (kind == K_PY || kind == K_SKIP) sc->nlv = lv_mark; /* levels of a line not typed */
    if (kind == K_PY) {
        int64_t n = e - p;
        if (grow((void **)&sc->py, &sc->pycap, sc->npy + n, 1)) { sc->oom = 1; return; }
        memcpy(sc->py + sc->npy, p, (size_t)n);
        r->a = sc->npy;
        r->b = n;
        r->nb = r->na = 0;
        r->sym = -1;
        r->flags = 0;
        sc->npy += n;
    }
    r->kind = (int8_t)kind;
    sc->n++;
}

/* Lines of buf[0:len): split at '\n' (a final line without one counts too). */
void scan_feed(scan_t *sc, const char *buf, int64_t len) {
    const char *p = buf, *e = buf + len;
    while (p < e && !sc->oom) {
        const char *nl = memchr(p, '\n', (size_t)(e - p));
        const char *end = nl ? nl : e;
        scan_line(sc, p, end);
        p = nl ? nl + 1 : e;
    }
}
