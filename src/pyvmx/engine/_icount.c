/*
 * Deterministic guest time for pyvmx: counts retired guest instructions per translation block
 * (TB) from Unicorn hooks written in C, so a compute loop pays a few nanoseconds per TB instead
 * of a Python call.  Unicorn's own instruction counter costs a C call per instruction (~12x).
 *
 *  - on_edge (UC_HOOK_EDGE_GENERATED) remembers each new TB's instruction count by start pc;
 *  - on_block (UC_HOOK_BLOCK) runs before a TB's body: it stops emulation when the TB would
 *    run past the deadline (the caller then runs the few instructions left one by one, so
 *    deadlines are exact to the instruction), or when an interrupt window is wanted and
 *    RFLAGS.IF = 1; otherwise it adds the TB's instruction count to the counter.  A stop
 *    requested here takes effect before the TB body runs (Unicorn checks the exit request right
 *    after the block hook).
 *
 * Loaded with ctypes; it does not link against Python or Unicorn: the functions it needs from
 * libunicorn are passed in as pointers.
 */
#include <stdint.h>

#define TB_TABLE_SIZE 65536u /* power of two */

typedef struct {
    uint64_t pc;
    uint16_t icount;
    uint16_t size;
} uc_tb_t;

typedef struct {
    uint64_t pc;
    uint32_t size;
    uint32_t icount;
} tb_entry_t;

typedef int (*uc_emu_stop_fn)(void *uc);
typedef int (*uc_reg_read_fn)(void *uc, int regid, void *value);

typedef struct {
    uint64_t icount;        /* instructions retired (counted per TB, corrected by Python) */
    uint64_t deadline;      /* stop before a TB that would take icount past deadline */
    uint64_t last_pc;       /* the last TB counted: start pc, byte size, instruction count */
    uint32_t last_size;
    uint32_t last_icount;
    uint32_t want_window;   /* stop at a TB boundary where RFLAGS.IF = 1 */
    uint32_t stop_reason;   /* 0 none, 1 deadline, 2 interrupt window */
    uc_emu_stop_fn emu_stop;
    uc_reg_read_fn reg_read;
    int eflags_regid;
    int pad;
    tb_entry_t table[TB_TABLE_SIZE];
} icount_state_t;

#define STOP_DEADLINE 1
#define STOP_WINDOW 2

static inline uint32_t slot_of(uint64_t pc)
{
    return (uint32_t)((pc ^ (pc >> 16) ^ (pc >> 32)) & (TB_TABLE_SIZE - 1));
}

void pyvmx_on_edge(void *uc, uc_tb_t *cur, uc_tb_t *prev, icount_state_t *st)
{
    tb_entry_t *e = &st->table[slot_of(cur->pc)];
    (void)uc;
    (void)prev;
    e->pc = cur->pc;
    e->size = cur->size;
    e->icount = cur->icount;
}

void pyvmx_on_block(void *uc, uint64_t pc, uint32_t size, icount_state_t *st)
{
    tb_entry_t *e;
    uint32_t n;

    e = &st->table[slot_of(pc)];
    n = (e->pc == pc && e->size == size) ? e->icount : 1; /* unknown TB: count one */
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
    st->icount += n;
    st->last_pc = pc;
    st->last_size = size;
    st->last_icount = n;
}
