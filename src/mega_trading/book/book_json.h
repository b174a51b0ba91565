/* The scanner's strict JSON pieces (private to book_scan.c): whitespace, strings without
 * escapes, int64 integers, decimal strings, literals, and skipping any value.
 *
 * A header of static inline functions, not a C file of its own: they run once per key and
 * per level of every line, and inlined into the scanner they cost no call.
 *
 * Decimal strings become the float64 Python's float() gives (correctly rounded): digits
 * <= 2^53 over a power of ten <= 10^22 are two exact doubles, and one IEEE division rounds
 * their quotient correctly (Clinger's fast path); anything longer goes through strtod,
 * which glibc rounds correctly too.
 */
#ifndef BOOK_JSON_H
#define BOOK_JSON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

#endif
