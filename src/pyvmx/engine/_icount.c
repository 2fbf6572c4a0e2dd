/*
 * Deterministic guest time for pyvmx: counts retired guest instructions per translation block
 * (TB) from Unicorn hooks written in C, so a compute loop pays a few nanoseconds per TB instead
 * of a Python call.  Unicorn's own instruction counter costs a C call per instruction (~12x).
 *
 *  - on_edge (UC_HOOK_EDGE_GENERATED) records each new TB's instruction count, keyed by its
 *    start pc and byte size, in an open-addressed hash table (linear probing, TB_PROBES slots);
 *  - on_block (UC_HOOK_BLOCK) runs before a TB's body: it stops emulation when the TB would
 *    run past the deadline (the caller then runs the few instructions left one by one, so
 *    deadlines are exact to the instruction), or when an interrupt window is wanted and
 *    RFLAGS.IF = 1; otherwise it adds the TB's instruction count to the counter.  A stop
 *    requested here takes effect before the TB body runs (Unicorn checks the exit request right
 *    after the block hook).
 *  - RFLAGS.RF is cleared once an instruction has completed (SDM 18.3.1.1): when the caller
 *    arms rf_watch (RF = 1 at the start of a run, or loaded by IRET), on_block clears RF before
 *    the second TB that runs -- QEMU itself clears it only at a TB end that leaves through
 *    gen_eob(), not after a direct jump, so RF would otherwise stay set (and PUSHF push it);
 *  - a TB the table does not hold (evicted from a full probe window) is never guessed: on_block
 *    stops before it with STOP_UNKNOWN_TB and its pc and size; the caller decodes the TB, stores
 *    its count with pyvmx_tb_insert, grants it for the next block hook (grant_*) and resumes.
 *  - two live TBs with one pc and size but different counts (the same bytes translated in two
 *    CPU modes) make their entry ambiguous: every run of that pc and size is decoded as above.
 *    So the count is exact for every code layout.
 *
 * Loaded with ctypes; it does not link against Python or Unicorn: the functions it needs from
 * libunicorn are passed in as pointers.  native.py mirrors icount_state_t with ctypes and checks
 * the mirror against pyvmx_layout() before using the library.
 */
#include <stddef.h>
#include <stdint.h>

#define TB_TABLE_BITS 16u
#define TB_TABLE_SIZE (1u << TB_TABLE_BITS)
#define TB_PROBES 16u

typedef struct {
    uint64_t pc;
    uint16_t icount;
    uint16_t size;
} uc_tb_t;

#define ENTRY_KNOWN 1
#define ENTRY_AMBIGUOUS 2

typedef struct {
    uint64_t pc;
    uint32_t size;
    uint16_t icount;
    uint16_t used;  /* 0 free, ENTRY_KNOWN, ENTRY_AMBIGUOUS */
} tb_entry_t;

typedef int (*uc_emu_stop_fn)(void *uc);
typedef int (*uc_reg_read_fn)(void *uc, int regid, void *value);
typedef int (*uc_reg_write_fn)(void *uc, int regid, const void *value);

typedef struct {
    uint64_t icount;        /* instructions retired (counted per TB, corrected by Python) */
    uint64_t deadline;      /* stop before a TB that would take icount past deadline */
    uint64_t last_pc;       /* the last TB counted: start pc, byte size, instruction count */
    uint32_t last_size;
    uint32_t last_icount;
    uint32_t want_window;   /* stop at a TB boundary where RFLAGS.IF = 1 */
    uint32_t stop_reason;   /* 0 none, 1 deadline, 2 interrupt window, 3 unknown TB */
    uint64_t miss_pc;       /* STOP_UNKNOWN_TB: the TB whose count the table lacks */
    uint32_t miss_size;
    uint32_t grant_icount;  /* the caller's count for the next block hook, if it is grant_pc/size */
    uint64_t grant_pc;
    uint32_t grant_size;    /* 0: no grant */
    uint32_t rf_watch;      /* 1: RF is set, the next TB is the first to run; 2: clear RF now */
    uc_emu_stop_fn emu_stop;
    uc_reg_read_fn reg_read;
    uc_reg_write_fn reg_write;
    int eflags_regid;
    int pad;
    tb_entry_t table[TB_TABLE_SIZE];
} icount_state_t;

#define STOP_DEADLINE 1
#define STOP_WINDOW 2
#define STOP_UNKNOWN_TB 3
#define RF_WATCH_FIRST_TB 1
#define RF_WATCH_CLEAR 2
#define EFLAGS_RF (1u << 16)

static inline uint32_t slot_of(uint64_t pc, uint32_t size)
{
    /* Fibonacci hashing: neighbouring and 64 KiB-apart pcs land far apart. */
    return (uint32_t)(((pc ^ ((uint64_t)size << 40)) * 0x9E3779B97F4A7C15ull) >> (64u - TB_TABLE_BITS));
}

static inline tb_entry_t *find(icount_state_t *st, uint64_t pc, uint32_t size)
{
    uint32_t slot = slot_of(pc, size);
    uint32_t k;
    for (k = 0; k < TB_PROBES; k++) {
        tb_entry_t *e = &st->table[(slot + k) & (TB_TABLE_SIZE - 1)];
        if (e->pc == pc && e->size == size && e->used)
            return e;
        if (!e->used)
            return 0;
    }
    return 0;
}

/* Entries are never emptied, only overwritten, so a probe sequence never breaks. */
void pyvmx_tb_insert(icount_state_t *st, uint64_t pc, uint32_t size, uint32_t icount)
{
    uint32_t slot = slot_of(pc, size);
    uint32_t k;
    tb_entry_t *e = &st->table[slot];
    for (k = 0; k < TB_PROBES; k++) {
        tb_entry_t *probe = &st->table[(slot + k) & (TB_TABLE_SIZE - 1)];
        if (probe->used && probe->pc == pc && probe->size == size) {
            if (probe->icount != (uint16_t)icount)
                probe->used = ENTRY_AMBIGUOUS;
            return;
        }
        if (!probe->used) {
            e = probe;
            break;
        }
    }
    e->pc = pc;
    e->size = size;
    e->icount = (uint16_t)icount;
    e->used = ENTRY_KNOWN;
}

void pyvmx_on_edge(void *uc, uc_tb_t *cur, uc_tb_t *prev, icount_state_t *st)
{
    (void)uc;
    (void)prev;
    pyvmx_tb_insert(st, cur->pc, cur->size, cur->icount);
}

void pyvmx_on_block(void *uc, uint64_t pc, uint32_t size, icount_state_t *st)
{
    tb_entry_t *e;
    uint32_t n;

    if (st->grant_size && st->grant_pc == pc && st->grant_size == size) {
        n = st->grant_icount;
        st->grant_size = 0;
    } else {
        st->grant_size = 0;
        e = find(st, pc, size);
        if (!e || e->used != ENTRY_KNOWN) {
            st->stop_reason = STOP_UNKNOWN_TB;
            st->miss_pc = pc;
            st->miss_size = size;
            st->emu_stop(uc);
            return;
        }
        n = e->icount;
    }
    if (st->icount + n > st->deadline) {
        st->stop_reason = STOP_DEADLINE;
        st->emu_stop(uc);
        return;
    }
    if (st->want_window) {
        uint64_t eflags = 0;
        st->reg_read(uc, st->eflags_regid, &eflags);
        if (eflags & (1u << 9)) {
            st->stop_reason = STOP_WINDOW;
            st->emu_stop(uc);
            return;
        }
    }
    if (st->rf_watch == RF_WATCH_FIRST_TB) {
        st->rf_watch = RF_WATCH_CLEAR;
    } else if (st->rf_watch == RF_WATCH_CLEAR) {
        uint64_t eflags = 0;
        st->reg_read(uc, st->eflags_regid, &eflags);
        if (eflags & EFLAGS_RF) {
            eflags &= ~(uint64_t)EFLAGS_RF;
            st->reg_write(uc, st->eflags_regid, &eflags);
        }
        st->rf_watch = 0;
    }
    st->icount += n;
    st->last_pc = pc;
    st->last_size = size;
    st->last_icount = n;
}

/* The structure layout as this compiler laid it out, for native.py to check its mirror. */
#define LAYOUT_FIELDS 23
int pyvmx_layout(uint64_t *out, int n)
{
    uint64_t values[LAYOUT_FIELDS] = {
        sizeof(icount_state_t),
        offsetof(icount_state_t, icount),
        offsetof(icount_state_t, deadline),
        offsetof(icount_state_t, last_pc),
        offsetof(icount_state_t, last_size),
        offsetof(icount_state_t, last_icount),
        offsetof(icount_state_t, want_window),
        offsetof(icount_state_t, stop_reason),
        offsetof(icount_state_t, miss_pc),
        offsetof(icount_state_t, miss_size),
        offsetof(icount_state_t, grant_icount),
        offsetof(icount_state_t, grant_pc),
        offsetof(icount_state_t, grant_size),
        offsetof(icount_state_t, emu_stop),
        offsetof(icount_state_t, reg_read),
        offsetof(icount_state_t, rf_watch),
        offsetof(icount_state_t, reg_write),
        offsetof(icount_state_t, eflags_regid),
        offsetof(icount_state_t, table),
        sizeof(tb_entry_t),
        offsetof(tb_entry_t, size),
        offsetof(tb_entry_t, icount),
        offsetof(tb_entry_t, used),
    };
    int i;
    for (i = 0; i < n && i < LAYOUT_FIELDS; i++)
        out[i] = values[i];
    return LAYOUT_FIELDS;
}
