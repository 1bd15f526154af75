/* Segment selectors and limits shared by boot.S and the C side. The
 * selector values are part of the ring-3 recipe in DEVELOPERS.md. */
#ifndef GUEST_LAYOUT_H
#define GUEST_LAYOUT_H

#define SEL_KERNEL_CODE 0x08
#define SEL_KERNEL_DATA 0x10
#define SEL_USER_DATA 0x18
#define SEL_USER_CODE 0x20
#define SEL_TSS 0x28
#define RPL_USER 3

/* Vector of the DPL-3 gate ring 3 uses for the few privileged services. */
#define SERVICE_VECTOR 0x80
#define SERVICE_PING 0
#define SERVICE_HALT 1
#define SERVICE_PING_REPLY 0x6e76687970657276ull /* "nvhyperv" */

/* Every exception stub in boot.S is padded to this size so the IDT can be
 * filled with stub_base + vector * ISR_STUB_SIZE. */
#define ISR_STUB_SIZE 16
#define EXCEPTION_VECTORS 32

/* RAM above 4 GiB gets page directories from a fixed pool: one 4 KiB
 * directory per GiB, for guest-physical addresses below 4 + HIGH_GIB_MAX GiB. */
#define HIGH_GIB_MAX 60

#endif
