"""Deploys infra/template.yaml into a moto server as a CloudFormation stack (scripts/deploy-local
is the entry point; it prepares the virtualenv and the binaries).

    python deploy-local.py deploy --endpoint URL --region R --stack-name N --bin-dir DIR \
        --param SourceBuckets=a,b --param TargetBuckets=c [--param K=V ...] [--expanded-out F]
    python deploy-local.py delete --endpoint URL --region R --stack-name N

`deploy` prints the stack's outputs as one JSON object on stdout.

What `sam deploy` does, done offline: each function's binary is zipped as `sam build` lays
it out (a zip holding one executable named `bootstrap`), uploaded to an S3 bucket of the
same server, and the template is expanded by aws-sam-translator (scripts/expand-sam.py)
with each function's CodeUri pointing at its zip. The expansion is then adapted for moto,
only where moto cannot take it (ADAPTATIONS below, each with its reason), and created as a
stack with the parameters given; the script waits for CREATE_COMPLETE.

The template itself is never changed for moto: what moto skips (the queue policy, the
alarms, the Function URL) is still in the expansion, created as no-ops by moto, and
checked on the expansion by tests/deploy.rs.
"""
import argparse
import importlib.util
import io
import json
import os
import sys
import time
import zipfile

import boto3

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# moto takes any credentials; these are the local stack's dummy ones.
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


def load_expander():
    """scripts/expand-sam.py (its file name is not an importable module name)."""
    spec = importlib.util.spec_from_file_location("expand_sam", os.path.join(HERE, "expand-sam.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def drop_status_url_output(template):
    """moto has no AWS::Lambda::Url: it creates nothing for StatusFunctionUrl, and
    `!GetAtt StatusFunctionUrl.FunctionUrl` in Outputs makes CreateStack answer 500."""
    template.get("Outputs", {}).pop("StatusUrl", None)


# Every change made to the expanded template before moto gets it, and why. Nothing else
# is changed; what moto accepts but does not create is listed in docs/deploy.md.
ADAPTATIONS = [
    ("Outputs.StatusUrl removed", drop_status_url_output),
]


def functions_of(template):
    """The SAM functions: logical id -> the workspace binary it is built from."""
    out = {}
    for name, resource in template["Resources"].items():
        if resource.get("Type") == "AWS::Serverless::Function":
            out[name] = resource["Metadata"]["BuildProperties"]["Binary"]
    return out


def zip_bootstrap(binary_path):
    """A zip as `sam build` (cargo-lambda) lays one function out: its executable, alone,
    named `bootstrap`, executable. Fast compression: debug binaries are large."""
    buffer = io.BytesIO()
    info = zipfile.ZipInfo("bootstrap", date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o100755 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    with open(binary_path, "rb") as f, zipfile.ZipFile(buffer, "w") as z:
        z.writestr(info, f.read(), compresslevel=1)
    return buffer.getvalue()


def client(service, args):
    return boto3.client(service, endpoint_url=args.endpoint, region_name=args.region, **CREDENTIALS)


def parse_params(pairs):
    params = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            sys.exit(f"deploy-local: --param {pair!r} is not KEY=VALUE")
        params.append({"ParameterKey": key, "ParameterValue": value})
    return params


def upload_code(args, template, log):
    """Zips and uploads each function's binary; returns logical id -> s3:// URI."""
    s3 = client("s3", args)
    # One artifacts bucket per server, as SAM's managed bucket; a prefix per stack.
    bucket = "crr-deploy-local-artifacts"
    kwargs = {"Bucket": bucket}
    if args.region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": args.region}
    try:
        s3.create_bucket(**kwargs)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    uris = {}
    for name, binary in functions_of(template).items():
        path = os.path.join(args.bin_dir, binary)
        if not os.path.isfile(path):
            sys.exit(f"deploy-local: {path} is missing (cargo build --bins)")
        key = f"{args.stack_name}/{name}/{binary}.zip"
        s3.put_object(Bucket=bucket, Key=key, Body=zip_bootstrap(path))
        uris[name] = f"s3://{bucket}/{key}"
        log(f"uploaded {binary} as s3://{bucket}/{key}")
    return uris


def expand(template_path, code_uris):
    expander = load_expander()
    return expander.expand(template_path, code_uris)


def wait_for(cfn, stack_name, done, log, timeout=300):
    start = time.time()
    while True:
        stack = cfn.describe_stacks(StackName=stack_name)["Stacks"][0]
        status = stack["StackStatus"]
        if status in done:
            return stack
        if status.endswith("FAILED") or status.endswith("ROLLBACK_COMPLETE"):
            events = cfn.describe_stack_events(StackName=stack_name)["StackEvents"]
            reasons = [
                f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason')}"
                for e in events
                if "FAILED" in e.get("ResourceStatus", "")
            ]
            sys.exit(f"deploy-local: stack {stack_name} is {status}: {reasons}")
        if time.time() - start > timeout:
            sys.exit(f"deploy-local: stack {stack_name} still {status} after {timeout} s")
        time.sleep(0.5)


def deploy(args):
    log = lambda m: print(f"deploy-local: {m}", file=sys.stderr)  # noqa: E731
    from cfnlint.decode import cfn_yaml

    template = cfn_yaml.load(args.template)
    code_uris = upload_code(args, template, log)
    expanded = expand(args.template, code_uris)
    for what, adapt in ADAPTATIONS:
        adapt(expanded)
        log(f"adapted for moto: {what}")
    if args.expanded_out:
        with open(args.expanded_out, "w") as f:
            json.dump(expanded, f, indent=1, default=str)
    cfn = client("cloudformation", args)
    cfn.create_stack(
        StackName=args.stack_name,
        TemplateBody=json.dumps(expanded, default=str),
        Parameters=parse_params(args.param),
        # SAM creates one role per function.
        Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
    )
    stack = wait_for(cfn, args.stack_name, {"CREATE_COMPLETE"}, log)
    log(f"stack {args.stack_name}: CREATE_COMPLETE")
    outputs = {o["OutputKey"]: o["OutputValue"] for o in stack.get("Outputs", [])}
    print(json.dumps(outputs, sort_keys=True))


def delete(args):
    cfn = client("cloudformation", args)
    cfn.delete_stack(StackName=args.stack_name)
    start = time.time()
    while time.time() - start < 300:
        try:
            stacks = cfn.describe_stacks(StackName=args.stack_name)["Stacks"]
        except cfn.exceptions.ClientError as e:
            # A deleted stack is no longer found by its name.
            if "does not exist" not in str(e):
                raise
            stacks = []
        if not stacks or stacks[0]["StackStatus"] == "DELETE_COMPLETE":
            print(f"deploy-local: stack {args.stack_name}: DELETE_COMPLETE", file=sys.stderr)
            return
        time.sleep(0.5)
    sys.exit(f"deploy-local: stack {args.stack_name} not deleted after 300 s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("deploy", "delete"):
        p = sub.add_parser(name)
        p.add_argument("--endpoint", required=True, help="the moto server, e.g. http://127.0.0.1:26205")
        p.add_argument("--region", default="us-east-1")
        p.add_argument("--stack-name", default="crr")
        if name == "deploy":
            p.add_argument("--template", default=os.path.join(ROOT, "infra", "template.yaml"))
            p.add_argument("--bin-dir", required=True, help="where crr-replicate, crr-backfill, crr-status are")
            p.add_argument("--param", action="append", default=[], help="KEY=VALUE, a template parameter")
            p.add_argument("--expanded-out", help="also write the template as deployed (JSON) here")
    args = parser.parse_args()
    os.environ.setdefault("AWS_DEFAULT_REGION", args.region)
    {"deploy": deploy, "delete": delete}[args.command](args)


if __name__ == "__main__":
    main()
