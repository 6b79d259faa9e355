"""A stand-in for the Hub at the ``HfApi`` boundary (shared by tests/hub and tests/test_cli.py)."""

from __future__ import annotations


class FakeHub:
    """Stands in for the Hub at the ``HfApi`` boundary: records repos and the exact bytes committed."""

    def __init__(self):
        self.repos: list[dict] = []
        self.commits: list[dict] = []

    def install(self, monkeypatch):
        import huggingface_hub

        hub = self

        def create_repo(self, repo_id, **kwargs):
            hub.repos.append({"repo_id": repo_id, **kwargs})
            from types import SimpleNamespace

            return SimpleNamespace(repo_id=repo_id)

        def create_commit(self, repo_id, operations, **kwargs):
            files = {}
            for op in operations:
                src = op.path_or_fileobj
                files[op.path_in_repo] = open(src, "rb").read() if isinstance(src, str) else bytes(src)
            hub.commits.append({"repo_id": repo_id, "files": files, **kwargs})
            return f"commit-{len(hub.commits)}"

        def refuse(*args, **kwargs):  # anything else would be network traffic
            raise AssertionError("unexpected Hub call")

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_file", refuse)
        return self
