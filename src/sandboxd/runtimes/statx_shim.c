/*
 * statx() without AT_NO_AUTOMOUNT, preloaded into gVisor sandboxes.
 *
 * Why: the Debian runsc (2022-12) answers statx(..., AT_NO_AUTOMOUNT, ...) with EINVAL, so
 * coreutils' `ls -l` and `stat` fail. There are no automounts inside a sandbox, so the flag can be
 * dropped. No libc: the syscall is made directly, and errno is set through libc's
 * __errno_location, which is always loaded in the programs that call statx().
 */
#define AT_NO_AUTOMOUNT 0x800
#define SYS_statx 332

extern int *__errno_location(void) __attribute__((weak));

int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf)
{
    long ret;
    register long r10 __asm__("r10") = (long)mask;
    register long r8 __asm__("r8") = (long)buf;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"((long)SYS_statx), "D"((long)dirfd), "S"(path),
                       "d"((long)(flags & ~AT_NO_AUTOMOUNT)), "r"(r10), "r"(r8)
                     : "rcx", "r11", "memory");
    if (ret < 0) {
        if (__errno_location)
            *__errno_location() = (int)-ret;
        return -1;
    }
    return (int)ret;
}
