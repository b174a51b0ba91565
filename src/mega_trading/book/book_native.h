/* What the book's two C files share (book/native_lib.py builds them into one library,
 * book_native, with mega_trading.core.native, and loads it with ctypes):
 *   book_scan.c   the scanner: capture lines straight into numeric records (rec_t);
 *   book_state.c  the book: its sides, output rows and the steady-state loop that applies
 *                 the scanner's records (book_run);
 * and, private to the scanner, book_json.h: the strict JSON pieces and number parsing.
 *
 * Why hand-written: the pure-Python path pays a JSON decode into Python objects plus a
 * SortedDict operation per level; no library parses Binance's decimal strings into
 * float64 arrays, and numpy cannot express the book's sequential state.
 *
 * The record and its codes are mirrored in book/native_lib.py (RECORD, K_*, F_*).
 */
#ifndef BOOK_NATIVE_H
#define BOOK_NATIVE_H

#include <stdint.h>
#include <stdlib.h>

enum { K_DIFF = 1, K_TRADE = 2, K_TICKER = 3, K_SNAPSHOT = 4, K_PY = 5, K_SKIP = 6 };
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

/* *p grown (doubling, from 1024 items) to hold `need` items of `item` bytes; -1 when out
 * of memory (*p is then unchanged). */
static inline int grow(void **p, int64_t *cap, int64_t need, size_t item) {
    if (need <= *cap) return 0;
    int64_t c = *cap ? *cap : 1024;
    while (c < need) c *= 2;
    void *q = realloc(*p, (size_t)c * item);
    if (!q) return -1;
    *p = q;
    *cap = c;
    return 0;
}

#endif
