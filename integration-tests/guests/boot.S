/*
 * Boot stub shared by all test guests.
 *
 * The PVH entry runs in 32-bit protected mode with paging off. On this
 * host ring 0 is emulated (about 350 ns per instruction) while ring 3 runs
 * natively, so everything that can be prepared at build time is: the GDT,
 * the TSS with its I/O permission bitmap and the page tables for the low
 * 4 GiB are assembled as data. At run time ring 0 only switches to long
 * mode, lets kernel_setup() fill the IDT and map RAM above 4 GiB, and drops
 * to ring 3 with iretq.
 */
#include "layout.h"

#define CR0_PE (1 << 0)
#define CR0_PG (1 << 31)
#define CR4_PAE (1 << 5)
#define MSR_EFER 0xc0000080
#define EFER_LME (1 << 8)

/* Page-table entry bits: present, writable, user-accessible (U/S at every
 * level so ring 3 can reach RAM and device MMIO), page size (2 MiB). */
#define PTE_TABLE 0x007
#define PTE_LARGE_RAM 0x087
/* Device hole pages are additionally cache-disabled / write-through. */
#define PTE_LARGE_DEVICE 0x09f
#define DEVICE_HOLE_START 0xc0000000

/* ---------------------------------------------------------------------- */
/* Xen PVH entry note: XEN_ELFNOTE_PHYS32_ENTRY (18), 32-bit entry address. */
	.section .note.pvh, "a", @note
	.balign 4
	.long 4			/* name size: "Xen\0" */
	.long 4			/* descriptor size */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.long pvh_entry

/* ---------------------------------------------------------------------- */
	.section .text.boot, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	/* EBX = hvm_start_info; it stays in EBX (callee-saved) until ring 3. */
	cli
	cld
	lgdt boot_gdt_descriptor
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $boot_pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $SEL_KERNEL_CODE, $long_mode_entry

	.code64
long_mode_entry:
	movl $SEL_KERNEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	leaq kernel_stack_top(%rip), %rsp
	movl %ebx, %edi
	call kernel_setup
	lidt idt_descriptor(%rip)
	movw $SEL_TSS, %ax
	ltr %ax

	/* Ring-3 data selectors, then an iretq frame for ring 3 with IF=0. */
	movl $(SEL_USER_DATA | RPL_USER), %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %fs
	movl %eax, %gs
	pushq $(SEL_USER_DATA | RPL_USER)
	leaq user_stack_top(%rip), %rax
	subq $8, %rax		/* SysV: rsp+8 is 16-byte aligned at entry */
	pushq %rax
	pushq user_entry_rflags(%rip)	/* IF=0, IOPL=0 unless a guest overrides it */
	pushq $(SEL_USER_CODE | RPL_USER)
	leaq user_entry(%rip), %rax
	pushq %rax
	movl %ebx, %edi
	iretq

/* ---------------------------------------------------------------------- */
/* Exception stubs, one per vector, each ISR_STUB_SIZE bytes. Vectors
 * without a CPU-pushed error code push 0 so the frame is uniform. */
	.text
	.balign ISR_STUB_SIZE
	.globl isr_stubs
isr_stubs:
	vector = 0
	.rept EXCEPTION_VECTORS
	.balign ISR_STUB_SIZE
	.if (vector == 8) || (vector == 10) || (vector == 11) || (vector == 12) || (vector == 13) || (vector == 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
	nop
	nop
	.else
	pushq $0
	.endif
	pushq $vector
	jmp isr_common
	vector = vector + 1
	.endr

isr_common:
	/* Stack: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
	movq 0(%rsp), %rdi
	movq 8(%rsp), %rsi
	movq 16(%rsp), %rdx
	movq 24(%rsp), %rcx
	movq %cr2, %r8
	andq $-16, %rsp
	call kernel_fault	/* does not return */
1:	cli
	hlt
	jmp 1b

/* int $0x80 from ring 3: service number in RAX, result in RAX. */
	.globl service_entry
service_entry:
	pushq %rdi
	pushq %rsi
	pushq %rdx
	pushq %rcx
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	movq %rax, %rdi
	subq $8, %rsp		/* 5-word frame + 8 saved: realign for the call */
	call kernel_service
	addq $8, %rsp
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rcx
	popq %rdx
	popq %rsi
	popq %rdi
	iretq

/* ---------------------------------------------------------------------- */
	.section .data.boot, "aw"
	.balign 16
	.globl boot_gdt
boot_gdt:
	.quad 0				/* null */
	.quad 0x00af9a000000ffff	/* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff	/* 0x10 kernel data */
	.quad 0x00cff2000000ffff	/* 0x18 user data, DPL 3 */
	.quad 0x00affa000000ffff	/* 0x20 user code, 64-bit, DPL 3 */
	.quad 0, 0			/* 0x28 TSS, base filled by kernel_setup */
boot_gdt_end:

boot_gdt_descriptor:
	.word boot_gdt_end - boot_gdt - 1
	.quad boot_gdt

/* RFLAGS ring 3 starts with: the reserved bit only (IF=0). Weak, so a guest
 * that takes interrupts (intcheck.c) defines its own with IF set. */
	.weak user_entry_rflags
user_entry_rflags:
	.quad 0x2

	.globl idt_descriptor
idt_descriptor:
	.word 0
	.quad 0

/* 64-bit TSS. RSP0 is the stack used when an interrupt or exception leaves
 * ring 3. IOPL is ignored for ring-3 port access on this host, so the I/O
 * permission bitmap is what lets ring 3 reach COM1 and the i8042. */
	.balign 16
	.globl boot_tss, boot_tss_end
boot_tss:
	.long 0
	.quad kernel_stack_top		/* RSP0 */
	.quad 0, 0			/* RSP1, RSP2 */
	.quad 0
	.quad 0, 0, 0, 0, 0, 0, 0	/* IST1..IST7 */
	.quad 0
	.word 0
	.word io_bitmap - boot_tss	/* I/O map base */
/* One bit per port 0x000-0xcff, 0 = allowed; ports past the TSS limit are
 * denied. Allowed: 0x60 and 0x64 (i8042), 0x3f8-0x3ff (COM1), 0x505
 * (pvpanic), 0x600 (ACPI shutdown/reset), 0xcf8-0xcff (PCI configuration). */
io_bitmap:
	.fill 0x60 / 8, 1, 0xff
	.byte 0xee			/* ports 0x60-0x67: 0x60 and 0x64 open */
	.fill 0x3f8 / 8 - 0x60 / 8 - 1, 1, 0xff
	.byte 0x00			/* ports 0x3f8-0x3ff open */
	.fill 0x500 / 8 - 0x3f8 / 8 - 1, 1, 0xff
	.byte 0xdf			/* ports 0x500-0x507: 0x505 open */
	.fill 0x600 / 8 - 0x500 / 8 - 1, 1, 0xff
	.byte 0xfe			/* ports 0x600-0x607: 0x600 open */
	.fill 0xcf8 / 8 - 0x600 / 8 - 1, 1, 0xff
	.byte 0x00			/* ports 0xcf8-0xcff open */
	.byte 0xff			/* required terminator byte */
boot_tss_end:

/* Identity map of the low 4 GiB with 2 MiB pages, built by the assembler:
 * RAM below 3 GiB and the device hole [3 GiB, 4 GiB). RAM above 4 GiB is
 * added by kernel_setup() from the start_info memory map. */
	.section .data.pagetables, "aw"
	.balign 4096
	.globl boot_pml4, boot_pdpt
boot_pml4:
	.quad boot_pdpt + PTE_TABLE
	.fill 511, 8, 0
boot_pdpt:
	.quad boot_pd_low + PTE_TABLE
	.quad boot_pd_low + 0x1000 + PTE_TABLE
	.quad boot_pd_low + 0x2000 + PTE_TABLE
	.quad boot_pd_low + 0x3000 + PTE_TABLE
	.fill 508, 8, 0
boot_pd_low:
	page = 0
	.rept 2048
	.if page < DEVICE_HOLE_START
	.quad page + PTE_LARGE_RAM
	.else
	.quad page + PTE_LARGE_DEVICE
	.endif
	page = page + 0x200000
	.endr

/* Stacks are never zeroed: nothing reads them before writing. */
	.section .noinit, "aw", @nobits
	.balign 4096
kernel_stack:
	.skip 16384
kernel_stack_top:
	.balign 4096
user_stack:
	.skip 65536
user_stack_top:

/* No executable stack. */
	.section .note.GNU-stack, "", @progbits
