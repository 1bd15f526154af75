/* Ring-0 hooks for guests that need more than the common boot stub: the few
 * that take interrupts (intcheck.c). Ring 0 is emulated on this host, so a
 * hook does a handful of stores and nothing else. */
#ifndef GUEST_KERNEL_H
#define GUEST_KERNEL_H

#include <stdint.h>

/* Called once at the end of the ring-0 setup, before the drop to ring 3.
 * The default does nothing; a guest defines its own to install handlers. */
void guest_kernel_setup(void);

/* Points IDT vector `vector` (32..SERVICE_VECTOR) at `handler`, a ring-0
 * interrupt gate: `handler` must end with iretq (gcc's interrupt
 * attribute). */
void kernel_set_interrupt_gate(unsigned vector, void (*handler)(void));

/* What the CPU pushes for an interrupt (gcc's interrupt attribute hands the
 * handler a pointer to it); (cs & 3) == 3 when ring 3 was interrupted. */
struct interrupt_frame {
	uint64_t rip;
	uint64_t cs;
	uint64_t rflags;
	uint64_t rsp;
	uint64_t ss;
};

#endif
