"""One NVRTC compile, through CuPy's NVRTC binding: source + template names +
options in, the binary and the lowered (mangled) kernel names out. Needs no
GPU, so the CPU test suite and `nvfp4-cupy warm --arch` use it too."""

from __future__ import annotations

from dataclasses import dataclass

from cupy_backends.cuda.libs import nvrtc


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel. The message holds the kernels asked for, the
    options and NVRTC's full log."""


@dataclass(frozen=True)
class CompiledProgram:
    image: bytes  # a cubin, or PTX text when compiled for -arch=compute_XX
    lowered_names: tuple[str, ...]  # in the order of the names asked for
    log: str  # NVRTC's log (ptxas's, with -Xptxas=-v)


def supported_archs() -> tuple[int, ...]:
    return tuple(nvrtc.getSupportedArchs())


def version() -> str:
    return ".".join(map(str, nvrtc.getVersion()))


def compile_program(source: str, filename: str, names: tuple[str, ...], options: tuple[str, ...]) -> CompiledProgram:
    program = nvrtc.createProgram(source, filename, [], [])
    try:
        for name in names:
            nvrtc.addNameExpression(program, name)
        try:
            nvrtc.compileProgram(program, list(options))
        except nvrtc.NVRTCError as exc:
            raise KernelCompileError(
                f"NVRTC {version()} could not compile {filename} ({exc}).\n"
                f"kernels: {', '.join(names)}\noptions: {' '.join(options)}\n"
                f"log:\n{_log(program)}"
            ) from None
        ptx_only = any(option.startswith("-arch=compute_") for option in options)
        return CompiledProgram(
            image=nvrtc.getPTX(program) if ptx_only else nvrtc.getCUBIN(program),
            lowered_names=tuple(nvrtc.getLoweredName(program, name) for name in names),
            log=_log(program),
        )
    finally:
        nvrtc.destroyProgram(program)


def _log(program) -> str:
    log = nvrtc.getProgramLog(program)
    return log.decode(errors="replace") if isinstance(log, bytes) else log
