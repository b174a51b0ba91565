/* The book's native fast path (book/native.py loads it with ctypes, mega_trading.core.native
 * builds it): a scanner that turns capture lines straight into numeric records, and the
 * book's steady-state loop (apply a synced diff, emit its level changes and top-of-book
 * row, record trades and bookTickers).
 *
 * Why hand-written: the pure-Python path pays a JSON decode into Python objects plus a
 * SortedDict operation per level; no library parses Binance's decimal strings into
 * float64 arrays, and numpy cannot express the book's sequential state.
 *
 * Exactness, not a second opinion: the scanner only types a line it fully understands
 * (a strict subset of JSON: ASCII strings without escapes, known keys once each, integers
 * that fit int64, decimal strings "-?d+(.d+)?"). Every other line becomes a PY record whose
 * bytes go back to Python, which decodes it with the same code as the pure-Python path.
 * Decimal strings become the float64 Python's float() gives (correctly rounded): digits
 * <= 2^53 over a power of ten <= 10^22 are two exact doubles, and one IEEE division rounds
 * their quotient correctly (Clinger's fast path);
 * anything longer goes through strtod, which glibc rounds correctly too. The loop stops
 * at every message that needs the book's control logic (a snapshot, a diff while no
 * book is synced or one that breaks the chain, a PY record, any price while a snapshot
 * awaits its plausibility check); Python handles that one message and calls back in.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { K_DIFF = 1, K_TRADE = 2, K_TICKER = 3, K_SNAPSHOT = 4, K_PY = 5, K_SKIP = 6 };
enum { R_NO_TIME = 1, R_UNUSED_STREAM = 2 };
enum { F_PU = 1, F_E = 2, F_M = 4 };

typedef struct {
    int64_t line, stamp;
    int64_t a, b, c, d;   /* DIFF U,u,pu,E; TRADE T,t; TICKER u; SNAPSHOT lastUpdateId; PY offset,len */
    double x0, x1, x2, x3; /* TRADE p,q; TICKER b,B,a,A */
    int64_t lvb, lva;      /* first bid / ask level (index into the level pairs) */
    int32_t nb, na;        /* bid / ask level counts */
    int32_t sym;           /* interned "s", -1 when absent */
    int8_t kind, flags, reason, pad;
} rec_t;

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

static int grow(void **p, int64_t *cap, int64_t need, size_t item) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * item);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

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

/* ---- strict JSON pieces: each returns the position after the value, or NULL ---------- */

#define MAX_DEPTH 64

static inline const char *ws(const char *p, const char *e) {
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\r' || *p == '\n')) p++;
    return p;
}

/* A string without escapes, control or non-ASCII bytes; its content in [*s, *s + *n). */
static inline const char *pstr(const char *p, const char *e, const char **s, int64_t *n) {
    if (p >= e || *p != '"') return NULL;
    const char *q = ++p;
    while (q < e) {
        unsigned char c = (unsigned char)*q;
        if (c == '"') {
            *s = p;
            *n = q - p;
            return q + 1;
        }
        if (c == '\\' || c < 0x20 || c >= 0x80) return NULL;
        q++;
    }
    return NULL;
}

/* A JSON integer that fits int64 (no fraction, no exponent, no leading zero). */
static inline const char *pint(const char *p, const char *e, int64_t *v) {
    int neg = 0;
    if (p < e && *p == '-') { neg = 1; p++; }
    const char *d = p;
    uint64_t m = 0;
    while (p < e && *p >= '0' && *p <= '9') {
        if (p - d >= 19) return NULL;
        m = m * 10 + (uint64_t)(*p - '0');
        p++;
    }
    int64_t nd = p - d;
    if (nd == 0 || (nd > 1 && *d == '0')) return NULL;
    if (p < e && (*p == '.' || *p == 'e' || *p == 'E')) return NULL;
    if (m > (uint64_t)INT64_MAX) return NULL;
    *v = neg ? -(int64_t)m : (int64_t)m;
    return p;
}

static const double POW10[23] = {1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10,
                                 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19,
                                 1e20, 1e21, 1e22};

/* The content of a decimal string "-?d+(.d+)?" as Python's float() reads it. */
static inline int pdec(const char *s, int64_t n, double *out) {
    const char *p = s, *e = s + n;
    int neg = 0;
    if (p < e && *p == '-') { neg = 1; p++; }
    uint64_t m = 0;
    int sig = 0, frac = 0, int_digits = 0;
    while (p < e && *p >= '0' && *p <= '9') {
        if (m || *p != '0') {
            if (++sig > 19) break;
            m = m * 10 + (uint64_t)(*p - '0');
        }
        int_digits++;
        p++;
    }
    if (sig <= 19 && p < e && *p == '.') {
        p++;
        const char *f = p;
        while (p < e && *p >= '0' && *p <= '9') {
            if (m || *p != '0') {
                if (++sig > 19) break;
                m = m * 10 + (uint64_t)(*p - '0');
            }
            frac++;
            p++;
        }
        if (p == f && sig <= 19) return -1; /* "1." */
    }
    if (sig <= 19 && int_digits == 0) return -1;
    if (sig <= 19 && p == e && m <= (UINT64_C(1) << 53) && frac <= 22) {
        double v = (double)m / POW10[frac];
        *out = neg ? -v : v;
        return 0;
    }
    /* Long: validate the whole pattern, then let strtod round it. */
    p = s + neg;
    const char *d0 = p;
    while (p < e && *p >= '0' && *p <= '9') p++;
    if (p == d0) return -1;
    if (p < e && *p == '.') {
        const char *f = ++p;
        while (p < e && *p >= '0' && *p <= '9') p++;
        if (p == f) return -1;
    }
    if (p != e || n > 120) return -1;
    char buf[128];
    memcpy(buf, s, (size_t)n);
    buf[n] = 0;
    *out = strtod(buf, NULL);
    return 0;
}

static inline const char *plit(const char *p, const char *e, const char *lit, int64_t n) {
    return (e - p >= n && memcmp(p, lit, (size_t)n) == 0) ? p + n : NULL;
}

/* Any JSON value in the strict subset (numbers: integers or plain fractions). */
static const char *skipv(const char *p, const char *e, int depth) {
    if (depth > MAX_DEPTH) return NULL;
    p = ws(p, e);
    if (p >= e) return NULL;
    const char *s;
    int64_t n;
    switch (*p) {
    case '"':
        return pstr(p, e, &s, &n);
    case '{':
        p = ws(p + 1, e);
        if (p < e && *p == '}') return p + 1;
        for (;;) {
            p = pstr(ws(p, e), e, &s, &n);
            if (!p) return NULL;
            p = ws(p, e);
            if (p >= e || *p != ':') return NULL;
            p = skipv(p + 1, e, depth + 1);
            if (!p) return NULL;
            p = ws(p, e);
            if (p < e && *p == ',') { p++; continue; }
            if (p < e && *p == '}') return p + 1;
            return NULL;
        }
    case '[':
        p = ws(p + 1, e);
        if (p < e && *p == ']') return p + 1;
        for (;;) {
            p = skipv(p, e, depth + 1);
            if (!p) return NULL;
            p = ws(p, e);
            if (p < e && *p == ',') { p++; continue; }
            if (p < e && *p == ']') return p + 1;
            return NULL;
        }
    case 't':
        return plit(p, e, "true", 4);
    case 'f':
        return plit(p, e, "false", 5);
    case 'n':
        return plit(p, e, "null", 4);
    default: {
        const char *q = p;
        if (q < e && *q == '-') q++;
        const char *d = q;
        while (q < e && *q >= '0' && *q <= '9') q++;
        if (q == d || q - d > 18 || (q - d > 1 && *d == '0')) return NULL;
        if (q < e && *q == '.') {
            const char *f = ++q;
            while (q < e && *q >= '0' && *q <= '9') q++;
            if (q == f || q - f > 18) return NULL;
        }
        if (q < e && (*q == 'e' || *q == 'E')) return NULL;
        return q;
    }
    }
}

/* Eight ASCII digits at p as a number, or -1 (SWAR, as in simdjson / fast_float):
 * Binance writes 8 decimals, so most fractions are one of these. */
static inline int64_t eight_digits(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    if ((((v & UINT64_C(0xF0F0F0F0F0F0F0F0)) |
          (((v + UINT64_C(0x0606060606060606)) & UINT64_C(0xF0F0F0F0F0F0F0F0)) >> 4)) !=
         UINT64_C(0x3333333333333333)))
        return -1;
    v -= UINT64_C(0x3030303030303030);
    v = (v * 10) + (v >> 8);
    v = (((v & UINT64_C(0x000000FF000000FF)) * (100 + (UINT64_C(1000000) << 32))) +
         (((v >> 16) & UINT64_C(0x000000FF000000FF)) * (1 + (UINT64_C(10000) << 32)))) >> 32;
    return (int64_t)(uint32_t)v;
}

/* A quoted decimal "-?d+(.d+)?" straight from the line in one pass (the common case);
 * anything else (escapes, long digit runs, exponents) goes through pstr + pdec. */
static inline const char *pdecq(const char *p, const char *e, double *out) {
    const char *q = p + 1;
    if (p >= e || *p != '"') return NULL;
    int neg = 0;
    if (q < e && *q == '-') { neg = 1; q++; }
    uint64_t m = 0;
    const char *d = q;
    while (q < e && (unsigned)(*q - '0') < 10) m = m * 10 + (uint64_t)(*q++ - '0');
    int64_t n_int = q - d, n_frac = 0;
    if (q < e && *q == '.') {
        const char *f = ++q;
        int64_t eight;
        if (e - q > 8 && n_int <= 11 && (eight = eight_digits(q)) >= 0) {
            m = m * 100000000 + (uint64_t)eight;
            q += 8;
        }
        while (q < e && (unsigned)(*q - '0') < 10) m = m * 10 + (uint64_t)(*q++ - '0');
        n_frac = q - f;
        if (n_frac == 0) return NULL;
    }
    if (q < e && *q == '"' && n_int > 0 && n_int + n_frac <= 19 && n_frac <= 22 &&
        m <= (UINT64_C(1) << 53)) {
        double v = (double)m / POW10[n_frac];
        *out = neg ? -v : v;
        return q + 1;
    }
    const char *s;
    int64_t n;
    p = pstr(p, e, &s, &n);
    if (!p || pdec(s, n, out)) return NULL;
    return p;
}

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

/* ---- the book --------------------------------------------------------------------- */

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
