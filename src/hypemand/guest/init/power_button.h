/* The ACPI power button as PID 1 sees it: input event devices that can report KEY_POWER.
 *
 * QEMU's system_powerdown raises an ACPI event (microvm: through the GED device, q35: the
 * fixed-feature power button); the kernel's "button" driver turns it into a KEY_POWER press on
 * an input device, which "evdev" exposes as /dev/input/eventN. */
#ifndef HYPEMAN_POWER_BUTTON_H
#define HYPEMAN_POWER_BUTTON_H

#define POWER_BUTTON_MAX_DEVICES 8

/* Open (non-blocking, close-on-exec) every /dev/input/event* that can report KEY_POWER.
 * Returns how many were stored in fds (at most max). */
int power_button_open(int *fds, int max);

/* Read all pending events of one device; returns 1 if one of them was a KEY_POWER press. */
int power_button_pressed(int fd);

#endif
