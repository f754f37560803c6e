"""Hadamard matrices of every order this module can construct, and the orthogonal rotations built from them.

A Hadamard matrix H of order n has entries +-1 and ``H H^T = n I``. Constructions used (REFERENCES.md section 2):

- Sylvester doubling: ``H_2n = [[H, H], [H, -H]]`` (every power of two);
- Paley I: order ``q + 1`` for a prime ``q = 3 mod 4`` (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, 104, 108, ...);
- Paley II: order ``2 (q + 1)`` for a prime ``q = 1 mod 4`` (12, 28, 36, 60, 76, 108, 124, ...);
- Kronecker products of the above (``H_a (x) H_b`` has order ``a b``).

Together they cover the sizes of the common transformers (384 = 12 x 32, 576 = 36 x 16, 1536 = 12 x 128, 3072,
4096, 11008 = 5504 x 2 with Paley I at q = 5503, 14336). Orders that need tables or prime-power fields (52, 92,
156, 172, ...) are refused with a clear error; ``rotation(n, "hadamard-or-random")`` falls back to a random
orthogonal matrix.
Most of these matrices are not symmetric: callers apply ``H`` on one side and ``H^T`` on the other.
"""

from __future__ import annotations

import functools

import numpy as np

from qcompiler.dialect.hadamard import sylvester
from qcompiler.errors import QCompilerError


class NoHadamardError(QCompilerError):
    """No Hadamard matrix of the requested order can be constructed here."""


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """``Q[i, j] = chi(j - i)`` with chi the quadratic character modulo the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if r in squares else -1 for r in range(1, q)], dtype=np.int64)
    index = (np.arange(q)[None, :] - np.arange(q)[:, None]) % q
    return chi[index]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 for a prime q = 3 mod 4: ``H = I + [[0, 1^T], [-1, Q]]``."""
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(n, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1) for a prime q = 1 mod 4, from the symmetric conference matrix C of order q + 1."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = np.array([[1, -1], [-1, -1]], dtype=np.int64)
    b = np.array([[1, 1], [1, -1]], dtype=np.int64)
    return np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)


@functools.lru_cache(maxsize=64)
def _construct(n: int) -> np.ndarray | None:
    if n == 1:
        return np.ones((1, 1), dtype=np.int64)
    if n == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    if n % 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1)
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley2(n // 2 - 1)
    half = _construct(n // 2)  # Sylvester doubling first: it keeps the fast power-of-two factor large
    if half is not None:
        return np.block([[half, half], [half, -half]])
    for a in range(4, int(n**0.5) + 1, 4):
        if n % a == 0:
            left, right = _construct(a), _construct(n // a)
            if left is not None and right is not None:
                return np.kron(left, right)
    return None


def has_hadamard(n: int) -> bool:
    return n >= 1 and _construct(n) is not None


def hadamard(n: int) -> np.ndarray:
    """The +-1 Hadamard matrix of order n (int64, ``H H^T = n I``).

    Raises:
        NoHadamardError: n has no construction here (every order must be 1, 2 or a multiple of 4; some
            multiples of 4, such as 156 and 172, need tables this module does not carry).
    """
    matrix = _construct(int(n)) if n >= 1 else None
    if matrix is None:
        raise NoHadamardError(
            f"no Hadamard matrix of order {n} can be constructed (Sylvester, Paley I/II and Kronecker products "
            "cover n = K * 2^m for most K); use rotation='random' for a random orthogonal matrix instead"
        )
    return matrix.copy()


def random_hadamard(n: int, seed: int = 0) -> np.ndarray:
    """``diag(s) H / sqrt(n)`` with random signs s: orthogonal (float64), the QuaRot rotation."""
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=n)
    return signs[:, None] * hadamard(n).astype(np.float64) / np.sqrt(n)


def random_orthogonal(n: int, seed: int = 0) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix with the sign of R's diagonal fixed)."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))[None, :]


def rotation(n: int, kind: str = "hadamard", seed: int = 0) -> np.ndarray:
    """An orthogonal n x n matrix: ``hadamard`` (randomised Hadamard; random orthogonal where none exists
    only if ``kind == "hadamard-or-random"``) or ``random``."""
    if kind == "random":
        return random_orthogonal(n, seed)
    if kind == "hadamard-or-random" and not has_hadamard(n):
        return random_orthogonal(n, seed)
    if kind in ("hadamard", "hadamard-or-random"):
        return random_hadamard(n, seed)
    raise ValueError(
        f"rotation kind {kind!r}: expected 'hadamard', 'hadamard-or-random', 'random' or (rotation passes, from "
        "calibration data) 'klt'"
    )


def klt_rotation(covariance: np.ndarray, seed: int = 0) -> np.ndarray:
    """MambaQuant's KLT-enhanced rotation ``K H``: K the eigenvectors of the activations' (uncentred) covariance
    ``C = E[x^T x]`` by decreasing eigenvalue, H a randomised Hadamard matrix (random orthogonal where no order-n
    Hadamard exists). ``x K`` has uncorrelated channels of variance ``lambda_i``, and every column of H has
    entries of magnitude ``1 / sqrt(n)``, so every channel of ``x K H`` has variance ``mean(lambda)``: the
    rotation equalises the channels exactly on the calibration data, where a Hadamard alone only does so on
    average.

    Raises:
        ValueError: a covariance that is not a finite symmetric square matrix.
    """
    c = np.asarray(covariance, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or not np.all(np.isfinite(c)):
        raise ValueError(f"covariance: expected a finite square matrix, got shape {c.shape}")
    if not np.allclose(c, c.T, rtol=1e-6, atol=1e-12 * max(float(np.abs(c).max()), 1e-300)):
        raise ValueError("covariance: not symmetric")
    values, vectors = np.linalg.eigh((c + c.T) / 2.0)
    order = np.argsort(-values, kind="stable")
    return vectors[:, order] @ rotation(c.shape[0], "hadamard-or-random", seed)


def online_hadamard(n: int) -> np.ndarray:
    """The +-1 Hadamard matrix ``S_{2^m} (x) H_K`` of order ``n = K 2^m`` with the largest m (smallest block):
    the structure the integer ``Hadamard`` op computes in ``n (K + m)`` adds (qcompiler.dialect.hadamard).

    Raises:
        NoHadamardError: no block order K = n / 2^m has a construction here.
    """
    m = (n & -n).bit_length() - 1 if n >= 1 else 0
    while m >= 0:
        k = n >> m
        if k == 1 or (k % 4 == 0 and has_hadamard(k)):
            return np.kron(sylvester(m), _construct(k))
        m -= 1
    raise NoHadamardError(
        f"no Hadamard matrix of order {n} = K * 2^m with a constructible block K; the online Hadamard needs one"
    )
