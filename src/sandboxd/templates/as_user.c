/*
 * as-user UID GID GROUPS ERRFD PROG [ARG...]: become UID/GID with the supplementary GROUPS
 * (comma-separated, "-" for none), then execve PROG (searched in the environment's PATH when it
 * has no '/') with ARG... as its argv[1...] and PROG as its argv[0].
 *
 * Why: envd starts every command as its user. Python forks the whole envd for that (CPython uses
 * vfork only when the child keeps its ids), and under gVisor a fork of envd costs ~50 ms; envd
 * vforks this tiny program instead, which switches ids and execs (a few ms).
 * An exec failure's errno is written to ERRFD (4 bytes, little-endian; the fd is closed on a
 * successful exec), so envd reports "no such file" as a failed start, as before, and not as a
 * process that exited 127. No libc: static, raw system calls, any template can run it.
 */
#define SYS_write 1
#define SYS_fcntl 72
#define SYS_execve 59
#define SYS_setuid 105
#define SYS_setgid 106
#define SYS_setgroups 116
#define SYS_exit_group 231
#define F_SETFD 2
#define FD_CLOEXEC 1
#define ENOENT 2
#define EACCES 13
#define MAX_GROUPS 256
#define PATH_BUF 4096

static long sys3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}

static void die(int fd, long err)
{
    unsigned int e = (unsigned int)(-err);
    unsigned char b[4] = {e & 0xff, (e >> 8) & 0xff, (e >> 16) & 0xff, (e >> 24) & 0xff};
    if (fd >= 0)
        sys3(SYS_write, fd, (long)b, 4);
    sys3(SYS_exit_group, 127, 0, 0);
}

static long number(const char *s, const char **end)
{
    long v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    *end = s;
    return v;
}

static int has_slash(const char *s)
{
    for (; *s; s++)
        if (*s == '/')
            return 1;
    return 0;
}

static const char *path_of(char **envp)
{
    for (; *envp; envp++) {
        const char *e = *envp;
        if (e[0] == 'P' && e[1] == 'A' && e[2] == 'T' && e[3] == 'H' && e[4] == '=')
            return e + 5;
    }
    return "/usr/local/bin:/usr/bin:/bin";
}

void as_user_main(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    char **envp = argv + argc + 1;
    const char *p;
    int errfd = -1;
    if (argc < 6)
        die(-1, -22);
    errfd = (int)number(argv[4], &p);
    unsigned int groups[MAX_GROUPS];
    long ngroups = 0;
    p = argv[3];
    if (p[0] != '-') {
        while (*p && ngroups < MAX_GROUPS) {
            groups[ngroups++] = (unsigned int)number(p, &p);
            if (*p == ',')
                p++;
            else if (*p)
                die(errfd, -22);
        }
    }
    long uid = number(argv[1], &p), gid = number(argv[2], &p), r;
    if ((r = sys3(SYS_setgroups, ngroups, (long)groups, 0)) < 0 || (r = sys3(SYS_setgid, gid, 0, 0)) < 0 ||
        (r = sys3(SYS_setuid, uid, 0, 0)) < 0 || (r = sys3(SYS_fcntl, errfd, F_SETFD, FD_CLOEXEC)) < 0)
        die(errfd, r);
    char *prog = argv[5];
    char **args = argv + 5;
    if (has_slash(prog))
        die(errfd, sys3(SYS_execve, (long)prog, (long)args, (long)envp));
    long err = -ENOENT;
    const char *dir = path_of(envp);
    char buf[PATH_BUF];
    while (1) {
        long n = 0;
        while (dir[n] && dir[n] != ':')
            n++;
        long len = 0;
        if (n == 0)
            buf[len++] = '.';
        for (long i = 0; i < n && len < PATH_BUF - 2; i++)
            buf[len++] = dir[i];
        buf[len++] = '/';
        for (const char *q = prog; *q && len < PATH_BUF - 1; q++)
            buf[len++] = *q;
        buf[len] = 0;
        r = sys3(SYS_execve, (long)buf, (long)args, (long)envp);
        if (r == -EACCES)
            err = r;  /* as execvp: EACCES wins over a later ENOENT */
        else if (r != -ENOENT && r != -20 /* ENOTDIR */ && err != -EACCES)
            err = r;
        if (!dir[n])
            break;
        dir += n + 1;
    }
    die(errfd, err);
}

__asm__(".global _start\n"
        "_start:\n"
        "  xor %rbp, %rbp\n"
        "  mov %rsp, %rdi\n"
        "  and $-16, %rsp\n"
        "  call as_user_main\n"
        "  hlt\n");
